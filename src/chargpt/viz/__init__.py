"""Pictures, drawn with matplotlib (the `plot` extra): loss curves (`plot`) and attention heatmaps
(`attention_plot`)."""
