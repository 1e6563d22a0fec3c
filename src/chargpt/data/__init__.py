"""Lab part a and the split: text in, token ids out.

`tokenizer` (the lab's `stoi`/`itos`/`encode`/`decode`), `corpus` (the bundled tiny Shakespeare
or any UTF-8 file), `dataset` (the 90/10 split and random `block_size` windows), `prepare` (large
corpora streamed into token arrays on disk), `files` (writes that a crash never leaves half-done).
"""
