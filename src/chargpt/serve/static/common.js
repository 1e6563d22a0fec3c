// What the playground (chargpt serve) and the exported page (chargpt export --format web) share:
// the sampling distribution, the next-character bars and how characters are shown. A classic
// script, not a module, so that the exported page also works opened from a file (file://); it
// defines `window.chargptPage`, which both pages' scripts read. No dependencies, no build step.
"use strict";

window.chargptPage = (() => {
  const GREEDY_BELOW = 1e-5; // chargpt.generation.sampling.GREEDY_BELOW: below it, greedy
  const SHOWN = { "\n": "↵", " ": "␣", "\t": "→" }; // characters that would print as nothing

  const $ = (id) => document.getElementById(id);

  function shown(char) {
    return SHOWN[char] ?? char;
  }

  function percent(p) {
    return p >= 0.1 ? `${(p * 100).toFixed(0)}%` : `${(p * 100).toFixed(1)}%`;
  }

  function setStatus(message, isError = false) {
    $("status").textContent = message;
    $("status").classList.toggle("error", isError);
  }

  // The temperature slider's value beside it, as the sampler reads it.
  function showTemperature() {
    $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
  }

  // The distribution chargpt.generation.sampling draws from: logits / temperature, the k
  // likeliest (ties: the smaller id first), the nucleus of those, renormalised. Temperature
  // below GREEDY_BELOW is greedy. Log-probabilities give the same as logits.
  function samplingDistribution(logits, temperature, topK, topP) {
    const order = [...logits.keys()].sort((a, b) => logits[b] - logits[a] || a - b);
    const probs = new Float64Array(logits.length);
    if (temperature < GREEDY_BELOW) {
      probs[order[0]] = 1;
      return probs;
    }
    const kept = topK > 0 ? order.slice(0, topK) : order;
    const top = logits[kept[0]] / temperature;
    const weights = kept.map((i) => Math.exp(logits[i] / temperature - top));
    const total = weights.reduce((a, b) => a + b, 0);
    let mass = 0;
    let nucleusTotal = 0;
    const nucleus = [];
    kept.forEach((i, rank) => {
      if (mass < topP) {
        nucleus.push([i, weights[rank]]);
        nucleusTotal += weights[rank];
      }
      mass += weights[rank] / total;
    });
    nucleus.forEach(([i, w]) => (probs[i] = w / nucleusTotal));
    return probs;
  }

  // One bar of the next-character chart: the probability with the sampling settings (the bar)
  // and the model's own (the tick). `mark` singles out one character: {word, says}, e.g. the
  // text's next one or the one drawn.
  function barRow(char, modelProb, sampledProb, mark = null) {
    const row = document.createElement("div");
    row.className = mark ? "bar-row next" : "bar-row";
    row.setAttribute("role", "img");
    row.setAttribute(
      "aria-label",
      `${char === " " ? "space" : char === "\n" ? "newline" : char}: ${percent(sampledProb)} ` +
        `when sampling, ${percent(modelProb)} for the model` +
        (mark ? `, ${mark.says}` : ""),
    );
    row.innerHTML =
      '<span class="char"></span><span class="track"><span class="bar"></span>' +
      '<span class="tick"></span></span><span class="value"></span>';
    row.querySelector(".char").textContent = shown(char);
    row.querySelector(".bar").style.width = `${sampledProb * 100}%`;
    row.querySelector(".tick").style.left = `${modelProb * 100}%`;
    row.querySelector(".value").textContent = percent(sampledProb) + (mark ? ` ← ${mark.word}` : "");
    return row;
  }

  return Object.freeze({
    GREEDY_BELOW,
    $,
    shown,
    percent,
    setStatus,
    showTemperature,
    samplingDistribution,
    barRow,
  });
})();
