"""fairseq adapters: registered optimizers, the two-pass task, checkpoint loading."""
