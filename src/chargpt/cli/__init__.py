"""The `chargpt` command: its parser, made from the config dataclasses (`parser`), and the
command handlers, a thin shell over the package's functions (`main`)."""
