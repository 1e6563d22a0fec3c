"""`chargpt serve`: OpenAI's completions API over a trained run, with continuous batching.

Needs the `serve` extra (`pip install 'chargpt[serve]'`); the rest of chargpt never imports this
package. `chargpt.serve.app.create_app(run, run_dir, settings)` builds the FastAPI app;
`chargpt.serve.server.serve` runs it with uvicorn as the `chargpt serve` command does.
"""
