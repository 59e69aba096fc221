"""Thin, pinned model wrappers (captioner, ITM/ITC filter, CLIP) and the offline tiny preset."""
