"""Image classification (the paper's ViT-B/16 on CIFAR-100 and SVHN): ``AutoModelForImageClassification``
with a new classifier, the model's own image processor, cross-entropy, accuracy.

Data: a Hugging Face dataset id (``uoft-cs/cifar100`` with ``data.image_field: img``,
``data.label_field: fine_label``; ``ufldl-stanford/svhn`` with ``data.subset: cropped_digits``) or a local
folder in the ``imagefolder`` layout (``train/<class>/*.png``, ``test/<class>/*.png``), read with
``datasets.load_dataset("imagefolder")``, whose class names are the folder names.

Preparation, once in the driver: every image is decoded to RGB and kept as uint8 pixels, at its own size
when all images share one (CIFAR's 32 x 32: 150 MB for 50,000 images), else resized to the processor's
input size. The processor itself (resize to the model's resolution, rescale, normalise) runs per batch:
its float32 output at 224 x 224 would be 36 GB for CIFAR-100, too much to prepare once and hand every
actor. It is deterministic, so a batch is the same whichever process builds it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ravan_ray.data import DataError
from ravan_ray.data.errors import one_line
from ravan_ray.models import load_image_processor
from ravan_ray.tasks.base import Arrays, ClassificationOptions, ClassificationTask, TaskData, to_device

DECODE_CHUNK = 1000  # images decoded at a time: bounds the driver's memory for PIL objects


class ImageClassificationOptions(ClassificationOptions):
    image_field: str = "image"


class ImageClassification(ClassificationTask):
    name = "image_classification"
    auto_class = "AutoModelForImageClassification"
    options_model = ImageClassificationOptions

    def prepare(self) -> TaskData:
        d = self.options
        splits = self.load_splits(label_field=d.label_field)
        splits.require({"image_field": d.image_field, "label_field": d.label_field})
        class_ids, names = self.class_labels(splits)
        size = self.input_size()
        prepared = {split: {"pixels": decode_images(splits.split(split), d.image_field, size, splits.where),
                            "labels": class_ids[split]} for split in ("train", *splits.evaluation_splits)}
        labels, partition_names = self.partition_labels(splits, (class_ids["train"], names))
        return TaskData(prepared["train"], prepared["test"], self.info, labels, partition_names,
                        validation=prepared.get("validation"))

    def preprocessor(self):
        return self.processor

    @property
    def processor(self):
        if not hasattr(self, "_processor"):
            self._processor = load_image_processor(self.config.model.name)
        return self._processor

    def input_size(self) -> tuple[int, int]:
        """(height, width) the processor resizes to."""
        size = getattr(self.processor, "size", None) or {}
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            edge = int(size["shortest_edge"])
            return edge, edge
        raise DataError(f"the image processor of model.name '{self.config.model.name}' names no input size "
                        f"(size: {size!r})")

    def batch(self, data: Arrays, rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        pixels = self.processor(images=list(data["pixels"][rows]), return_tensors="pt")["pixel_values"]
        return {"pixel_values": to_device(pixels.numpy(), device),
                "labels": to_device(np.ascontiguousarray(data["labels"][rows]), device)}


def decode_images(ds: Any, field: str, size: tuple[int, int], where: str) -> np.ndarray:
    """(n, height, width, 3) uint8 RGB pixels of a split's images: at their own size when they all share
    one, else resized to ``size`` (bilinear, as the processor would)."""
    from PIL import Image

    images = []
    for start in range(0, ds.num_rows, DECODE_CHUNK):
        try:
            chunk = [image.convert("RGB") if isinstance(image, Image.Image) else image
                     for image in ds[start:start + DECODE_CHUNK][field]]
        except Exception:  # PIL's UnidentifiedImageError, "image file is truncated" (OSError), ...: name the file
            raise DataError(_unreadable_image(ds, field, range(start, min(start + DECODE_CHUNK, ds.num_rows)),
                                              where)) from None
        for image in chunk:
            if not isinstance(image, Image.Image):
                raise DataError(f"data.image_field '{field}' of {where} does not hold images "
                                f"(found a {type(image).__name__})")
            images.append(image)
    if len({image.size for image in images}) > 1:
        height, width = size
        images = [image.resize((width, height), Image.Resampling.BILINEAR) for image in images]
    return np.stack([np.asarray(image, dtype=np.uint8) for image in images])


def _unreadable_image(ds: Any, field: str, rows: range, where: str) -> str:
    """One line naming the first of these rows' images that does not decode (the file where it has one)."""
    import io

    import datasets
    from PIL import Image

    stored = ds.cast_column(field, datasets.Image(decode=False))
    for row in rows:
        entry = stored[row][field]
        try:
            with Image.open(entry["path"] if entry.get("bytes") is None else io.BytesIO(entry["bytes"])) as image:
                image.convert("RGB")
        except Exception as error:
            name = entry.get("path") or f"row {row}"
            return f"{where}: image {name} cannot be read ({type(error).__name__}: {one_line(error)})"
    return f"{where}: an image in rows {rows.start}-{rows.stop - 1} cannot be read"
