"""Training in TensorFlow: fine-tuning the last blocks of a backbone (:mod:`.finetune`) and new layers on a
cut point or from scratch (:mod:`.custom_model`, with its layer language in :mod:`.new_layers`).

Every module here imports TensorFlow lazily, inside the functions that train."""

__all__: list[str] = []
