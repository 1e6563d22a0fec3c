"""Lab part i: the training loop (`trainer`) with its loss estimate (`estimate`), optimisers and
schedule (`optim`), resumable state (`state`, `resume`), training time (`clock`), how a run ends
(`outcome`) and several processes (`distributed`)."""
