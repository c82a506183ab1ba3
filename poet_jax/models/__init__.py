"""The models trained with the library: the Llama (its attention core and
loss), and its Hugging Face format."""
