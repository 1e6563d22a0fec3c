"""Scoring trained runs: the full-pass evaluation (`evaluate`), closed-form count references
(`counts`) and lab part j, the bigram against the GPT (`compare`)."""
