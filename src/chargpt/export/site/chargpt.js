// chargpt in the browser: the exported graph (model.onnx) run by onnxruntime-web, with the
// decoding loop of chargpt.generation (a KV cache, the Window rule of generation.decoders) and
// its sampling controls. Nothing is fetched from outside this folder.
//
// API (docs/export.md):
//   await window.chargpt.ready                       -> model.json (vocabulary, config)
//   await window.chargpt.generate(prompt, {maxTokens, temperature, topK, topP, seed,
//                                          onToken, signal})  -> the new text
// onToken(char, next) is called for each new character (next: the distribution it was drawn
// from); signal is an AbortSignal that stops early. Greedy text (temperature 0) is
// `chargpt sample --temperature 0`'s; sampled text uses its own random numbers, not torch's.
// What the page shares with the playground (the sampling distribution, the bars) is common.js's
// `window.chargptPage`, loaded first.
"use strict";

(() => {
  const { GREEDY_BELOW, $, shown, percent, setStatus } = window.chargptPage;
  const { showTemperature, samplingDistribution, barRow } = window.chargptPage;
  const BARS = 10; // characters shown in the next-character bars
  const DRAWN = { word: "drawn", says: "drawn" }; // the drawn character's bar's mark

  ort.env.wasm.numThreads = 1; // threads need cross-origin isolation, which static hosts lack
  ort.env.wasm.wasmPaths = new URL(".", document.currentScript.src).href; // this folder only

  const started = performance.now();
  const stats = { loadMs: null, firstCharMs: null, charsPerSecond: null };

  const ready = (async () => {
    const meta = await (await fetch("model.json")).json();
    const session = await ort.InferenceSession.create("model.onnx", {
      executionProviders: ["wasm"],
    });
    stats.loadMs = performance.now() - started;
    return { meta, session };
  })();

  // One sequence's logits as it grows (chargpt.export.runtime.OnnxDecoder): the prompt is read
  // once, then one position per character with the presents fed back as pasts; when the cache
  // holds block_size positions it restarts from the last window_keep_ids ids.
  class Decoder {
    constructor(session, meta) {
      this.session = session;
      this.meta = meta;
      this.pastNames = session.inputNames.filter((name) => name !== "ids");
    }

    async prefill(ids) {
      this.ids = ids.slice(-this.meta.block_size); // the ids of the last prefill
      this.stepped = []; // ids run one at a time since, not in this.ids
      const { n_head, head_size } = this.meta;
      const empty = () => new ort.Tensor("float32", new Float32Array(0), [1, n_head, 0, head_size]);
      await this.run(this.ids, Object.fromEntries(this.pastNames.map((n) => [n, empty()])));
    }

    async append(id) {
      if (this.length < this.meta.block_size) {
        this.stepped.push(id);
        const pasts = Object.fromEntries(this.pastNames.map((n) => [n, this.presents[presentName(n)]]));
        await this.run([id], pasts);
        return;
      }
      const ids = [...this.ids, ...this.stepped, id].slice(-this.meta.block_size);
      await this.prefill(ids.slice(-this.meta.window_keep_ids));
    }

    async run(ids, pasts) {
      const idsTensor = new ort.Tensor("int64", BigInt64Array.from(ids, BigInt), [1, ids.length]);
      const out = await this.session.run({ ids: idsTensor, ...pasts });
      const vocab = this.meta.vocab.length;
      this.logits = out.logits.data.slice((ids.length - 1) * vocab, ids.length * vocab);
      this.length = out[presentName(this.pastNames[0])].dims[2]; // positions cached
      this.presents = out;
    }
  }

  function presentName(pastName) {
    return pastName.replace(/^past\./, "present.");
  }

  function softmax(logits) {
    const top = Math.max(...logits);
    const weights = Array.from(logits, (x) => Math.exp(x - top));
    const total = weights.reduce((a, b) => a + b, 0);
    return weights.map((w) => w / total);
  }

  // mulberry32: a small seeded generator, uniform in [0, 1)
  function randomStream(seed) {
    let a = seed >>> 0;
    return () => {
      a = (a + 0x6d2b79f5) >>> 0;
      let t = Math.imul(a ^ (a >>> 15), a | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }

  function draw(probs, random) {
    const u = random();
    let cumulative = 0;
    let last = 0;
    for (let i = 0; i < probs.length; i++) {
      if (probs[i] === 0) continue;
      cumulative += probs[i];
      last = i;
      if (u < cumulative) return i;
    }
    return last; // rounding left u above the total
  }

  // Prompt ids as chargpt.generation.generate.encode_prompt makes them: an unknown character is
  // an error; an empty prompt starts from a newline.
  function encode(meta, prompt) {
    const index = new Map(meta.vocab.map((c, i) => [c, i]));
    const unknown = [...new Set([...prompt].filter((c) => !index.has(c)))];
    if (unknown.length) {
      const listed = unknown.map((c) => JSON.stringify(c)).join(", ");
      throw new Error(`the prompt has characters the model never saw: ${listed}: remove them`);
    }
    const ids = [...prompt].map((c) => index.get(c));
    return ids.length ? ids : [index.get("\n") ?? 0];
  }

  async function generate(prompt, options = {}) {
    const { meta, session } = await ready;
    const maxTokens = options.maxTokens ?? 300;
    const temperature = options.temperature ?? 1.0;
    const topK = options.topK ?? 0;
    const topP = options.topP ?? 1.0;
    const seed = options.seed ?? Math.floor(Math.random() * 2 ** 31);
    if (!(temperature >= 0) || !(topK >= 0) || !(topP > 0 && topP <= 1) || !(maxTokens >= 0)) {
      throw new Error("temperature >= 0, topK >= 0, 0 < topP <= 1 and maxTokens >= 0, please");
    }
    const random = randomStream(seed);
    const decoder = new Decoder(session, meta);
    const begun = performance.now();
    let text = "";
    if (maxTokens > 0) await decoder.prefill(encode(meta, prompt));
    for (let step = 0; step < maxTokens && !options.signal?.aborted; step++) {
      if (step) await decoder.append(decoder.nextId);
      const probs = samplingDistribution(decoder.logits, temperature, topK, topP);
      decoder.nextId = temperature < GREEDY_BELOW ? argmax(probs) : draw(probs, random);
      const char = meta.vocab[decoder.nextId];
      text += char;
      if (step === 0) stats.firstCharMs = performance.now() - begun;
      options.onToken?.(char, { logits: decoder.logits, probs, id: decoder.nextId });
    }
    const seconds = (performance.now() - begun) / 1000;
    stats.charsPerSecond = text.length / seconds;
    return text;
  }

  function argmax(values) {
    let best = 0;
    for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
    return best;
  }

  window.chargpt = { ready: ready.then(({ meta }) => meta), generate, stats, samplingDistribution };

  // ---- the page ----

  let controller = null;

  function renderBars(meta, char, next) {
    const model = softmax(next.logits);
    const order = [...next.probs.keys()].sort(
      (a, b) => next.probs[b] - next.probs[a] || model[b] - model[a] || a - b,
    );
    const shownIds = order.slice(0, BARS);
    if (!shownIds.includes(next.id)) shownIds.push(next.id); // the drawn one, even if unlikely
    const rows = shownIds.map((i) =>
      barRow(meta.vocab[i], model[i], next.probs[i], i === next.id ? DRAWN : null),
    );
    $("bars").replaceChildren(...rows);
    $("bars-legend").hidden = false;
    $("position").textContent =
      `The model drew “${shown(char)}” (${percent(next.probs[next.id])} with these settings, ` +
      `${percent(model[next.id])} for the model).`;
  }

  async function onGenerate() {
    const meta = await ready.then(({ meta }) => meta);
    const prompt = $("prompt").value;
    const seedText = $("seed").value.trim();
    controller = new AbortController();
    $("generate").disabled = true;
    $("stop").disabled = false;
    const promptSpan = document.createElement("span");
    promptSpan.className = "prompt";
    promptSpan.textContent = prompt;
    const output = document.createElement("span");
    $("text").replaceChildren(promptSpan, output);
    setStatus("Generating…");
    try {
      const text = await generate(prompt, {
        maxTokens: Number($("max-tokens").value),
        temperature: Number($("temperature").value),
        topK: Number($("top-k").value),
        topP: Number($("top-p").value),
        seed: seedText === "" ? undefined : Number(seedText),
        signal: controller.signal,
        onToken: (char, next) => {
          output.textContent += char;
          renderBars(meta, char, next);
        },
      });
      setStatus(
        `${text.length} characters; first after ${stats.firstCharMs.toFixed(0)} ms, ` +
          `${stats.charsPerSecond.toFixed(0)} chars/s`,
      );
    } catch (err) {
      setStatus(err.message, true);
    } finally {
      $("generate").disabled = false;
      $("stop").disabled = true;
    }
  }

  function describe(meta) {
    const c = meta.model_config;
    const loss = meta.val_loss == null ? "" : `, val loss <strong>${meta.val_loss.toFixed(3)}</strong>`;
    $("facts").innerHTML =
      `<strong></strong>: ${meta.parameters.toLocaleString()} parameters, ${c.n_layer} layers × ` +
      `${c.n_head} heads, context ${c.block_size}, vocabulary ${meta.vocab.length}${loss}; ` +
      `loaded in ${(stats.loadMs / 1000).toFixed(2)} s`;
    $("facts").querySelector("strong").textContent = meta.name;
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("temperature").addEventListener("input", showTemperature);
    $("generate").addEventListener("click", onGenerate);
    $("stop").addEventListener("click", () => controller?.abort());
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape") controller?.abort();
      if (event.key === "Enter" && event.ctrlKey && !$("generate").disabled) onGenerate();
    });
    ready.then(
      ({ meta }) => {
        describe(meta);
        $("generate").disabled = false;
      },
      (err) => {
        $("facts").textContent = `The model did not load: ${err.message}`;
        setStatus(String(err.message), true);
      },
    );
  });
})();
