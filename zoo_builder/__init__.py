"""Zoo builder: ViT factory, datasets, population training, the zoo format and importers."""

from vitzoo.zoo_builder.zoo import Zoo, ZooEntry, ZooError

__all__ = ["Zoo", "ZooEntry", "ZooError"]
