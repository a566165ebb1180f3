"""Tiny-LM recipes (RethinkTinyLM): compact tokenizer, parameter inheritance, resampling."""
