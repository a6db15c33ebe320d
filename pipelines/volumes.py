"""What analysis models read from the archive: input volumes, class maps and per-scan targets.

* :func:`read_input`: a scan's ``image``, ``derived/<name>``, ``recon/<key>`` or its
  ``measurements`` as a float32 ``(C, D, H, W)`` network input. Images are divided by their
  99.5th percentile (robust to a few bright voxels, and the same for a reference and for a
  reconstruction of it, whatever their scale). MRI k-space, on the full Cartesian grid with
  zeros where it was not sampled (so a frequency keeps its place whatever the mask), becomes two
  channels per coil: the log-magnitude ``log(1 + |k| / s)`` (``s`` the mean magnitude of the
  sampled entries) and the phase divided by π. A sinogram, or a low-resolution image
  ``(D, H/f, W/f)``, is one channel, scaled like an image.
* :func:`class_map`: ``classes`` of a spec (output class -> label names or values) as a lookup
  table from label value to class index (0: background), with names from the label volume's
  ``classes`` attribute.
* :func:`scan_target`: 1 when a scan's label volume contains a named class (a lesion), else 0.
"""

from __future__ import annotations

import numpy as np

from pipelines.errors import ArchiveError, StageError
from pipelines.store import Archive

__all__ = ["read_input", "label_names", "class_map", "read_classes", "scan_target", "input_channels"]


def _scale(volume: np.ndarray) -> np.ndarray:
    top = float(np.percentile(np.abs(volume), 99.5))
    return (volume / top if top > 0 else volume).astype(np.float32)


def read_input(archive: Archive, scan_id: str, source: str) -> np.ndarray:
    """The network input of one scan from ``source`` (see the module docstring), ``(C, D, H, W)``.

    Raises:
        StageError: the scan has no such array (naming the scan and what it has).
    """
    if source == "measurements":
        from pipelines.physics import MEASUREMENT_ARRAYS, Acquisition

        try:
            modality = Acquisition.modality_of(archive, scan_id)  # the committed array, as reads see it
        except ArchiveError as exc:
            raise StageError(str(exc)) from None
        if modality == "mri":
            k = Acquisition.from_archive(archive, scan_id).read(archive, scan_id).numpy()  # on the full grid
            k = k[:, None] if k.ndim == 3 else k  # (D, C, H, W) complex, zeros where not sampled
            mag = np.abs(k)
            sampled = mag[mag > 0]
            s = float(sampled.mean()) if sampled.size else 1.0
            channels = [np.log1p(mag / s), np.angle(k) / np.pi]  # each (D, C, H, W)
            return np.concatenate([c.transpose(1, 0, 2, 3) for c in channels]).astype(np.float32)
        return _scale(archive.read_array(scan_id, MEASUREMENT_ARRAYS[modality]))[None]  # real: one channel
    name = archive.reference_name(scan_id) if source == "image" else source
    if not archive.has_array(scan_id, name):
        raise StageError(f"scan {scan_id!r} has no array {name!r}; expected it from an earlier stage")
    volume = archive.read_array(scan_id, name)
    if np.iscomplexobj(volume):
        volume = np.abs(volume)
    return _scale(volume)[None]


def input_channels(archive: Archive, scan_id: str, source: str) -> int:
    """The number of channels :func:`read_input` gives for ``source`` (without reading the data)."""
    if source != "measurements":
        return 1
    from pipelines.physics import Acquisition

    if Acquisition.modality_of(archive, scan_id) == "mri":
        return 2 * int(archive.open_array(scan_id, "kspace").shape[1])  # magnitude and phase per coil
    return 1


def label_names(archive: Archive, scan_id: str) -> list[str]:
    """The names of a scan's label values (``labels`` attribute ``classes``), or [] when unnamed."""
    return [str(n) for n in archive.open_array(scan_id, "labels").attrs.get("classes", [])]


def class_map(classes: dict[str, list[str | int]] | None, names: list[str]) -> tuple[list[str], np.ndarray]:
    """``(class names with background first, lookup table label value -> class index)``.

    ``classes`` None: every named label value is its own class. A value listed under no class is
    background.

    Raises:
        StageError: a name that the labels do not have, a value listed twice, or no names and no
            ``classes`` to go by.
    """
    if classes is None:
        if not names:
            raise StageError(
                "the label volumes do not name their values: give the train_task stage classes, "
                "e.g. {tumour: [1], oedema: [2]}"
            )
        classes = {n: [n] for n in names[1:]}
    lut = np.zeros(256, np.int64)
    seen: dict[int, str] = {}
    for index, (cls, members) in enumerate(classes.items(), start=1):
        for member in members:
            if isinstance(member, str):
                if member not in names:
                    raise StageError(f"class {cls!r}: the labels have no {member!r}; they name {names}")
                value = names.index(member)
            else:
                value = int(member)
            if not 0 <= value < 256:
                raise StageError(f"class {cls!r}: label value {value} is outside 0-255")
            if value in seen:
                raise StageError(f"label {member!r} is in classes {seen[value]!r} and {cls!r}; give it one")
            seen[value] = cls
            lut[value] = index
    return ["background", *classes], lut


def read_classes(archive: Archive, scan_id: str, lut: np.ndarray) -> np.ndarray:
    """A scan's label volume mapped to class indices, int64 ``(D, H, W)``."""
    if not archive.has_array(scan_id, "labels"):
        raise StageError(f"scan {scan_id!r} has no label volume; segmentation needs one per scan")
    return lut[archive.read_array(scan_id, "labels")]


def scan_target(archive: Archive, scan_id: str, target: str) -> int:
    """1 when ``scan_id``'s label volume holds the class named ``target``, else 0."""
    names = label_names(archive, scan_id)
    if target not in names:
        raise StageError(
            f"scan {scan_id!r}: its labels have no class {target!r}; they name {names or 'none'}"
        )
    return int(bool((archive.read_array(scan_id, "labels") == names.index(target)).any()))
