"""Taking a trained run elsewhere: one ONNX graph with its KV cache (`onnx_graph`), sampling and
scoring it in onnxruntime (`runtime`), and a static web page that runs it in the browser with
onnxruntime-web (`web`). Needs the `export` extra; nothing here is imported by `import chargpt`."""
