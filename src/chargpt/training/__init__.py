"""Lab part i: the training loop (`trainer`) with its loss estimate (`estimate`), optimisers and
schedule (`optim`), resumable state (`state`, `resume`) and several processes (`distributed`)."""
