"""Language models: text corpora and vocabularies, the model, training, evaluation and sampling."""
