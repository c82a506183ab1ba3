"""The data: corpora, tokenizers, cached token shards and batches.

pipeline.py holds the entry points (open_token_stream, open_train_and_eval);
the modules beside it do the work. See docs/data.md.
"""
