"""Videos stored as folders of frame images (VideoMAE V2's and mmaction2's "rawframes"), read like a video.

A folder's frames are its image files (``.jpg``, ``.jpeg``, ``.png``) in the order of the number in their names
(the last run of digits: ``img_00001.jpg``, ``00001.jpg``, ``frame_7.png``), which must run without gaps or
repeats; frame ``i`` is the ``i``-th of them whatever the first number is (VideoMAE V2's ``--start_idx`` and
``--fname_tmpl`` are therefore not needed); next to mmaction2's flow images (``flow_x_*``, ``flow_y_*``) only the
``img_*`` files are frames. The folder is listed once per open; nothing is read from the list's
frame-count column.

Every frame is a separate image, so a clip costs the decoding of its own frames only, wherever it lies in the
video (a video decoder must decode every reference frame from the keyframe before the clip on). Images are decoded
with torchvision's libjpeg-turbo / libpng (``torchvision.io.decode_image``): PIL's pixels on JPEG, and faster than
PIL's ``Image.open().convert("RGB")`` here (568x320 JPEG, quality 95: 1.99 vs 2.51 ms median, measured interleaved on
the 2-core dev machine, 2026-12-01); one image per call on one core, like the video readers.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, read_file

from video_io import Region, VideoDecodeError, check_indices, check_region

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
FLOW_PREFIXES = ("flow_x_", "flow_y_")  # mmaction2's optical-flow images beside the RGB frames
RGB_PREFIX = "img_"
_NUMBER = re.compile(r"(\d+)(?!.*\d)")  # the last run of digits in a file name


def list_frames(folder: str) -> list[str]:
    """The folder's frame image file names in frame order; raises ``ValueError`` naming what is wrong.

    mmaction2 extracts optical flow next to the RGB frames (``img_00001.jpg``, ``flow_x_00001.jpg``,
    ``flow_y_00001.jpg``): when flow images are there, only the ``img_`` files are the video's frames."""
    with os.scandir(folder) as it:
        names = [e.name for e in it if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]
    if any(n.startswith(FLOW_PREFIXES) for n in names):
        names = [n for n in names if n.startswith(RGB_PREFIX)]
        if not names:
            raise ValueError(f"only optical-flow images ({', '.join(p + '*' for p in FLOW_PREFIXES)}), no "
                             f"{RGB_PREFIX}* frames in the folder")
    numbered = []
    for name in names:
        m = _NUMBER.search(os.path.splitext(name)[0])
        if m is None:
            raise ValueError(f"frame image {name!r} has no frame number in its name")
        numbered.append((int(m.group(1)), name))
    if not numbered:
        raise ValueError(f"no frame images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
    numbered.sort()
    first, last = numbered[0][0], numbered[-1][0]
    have = {n for n, _ in numbered}
    if len(have) < len(numbered):  # on its own: a duplicate and a gap would cancel out in the count below
        dup = [name for (n, name), (m, _) in zip(numbered[1:], numbered) if n == m]
        raise ValueError(f"two frame images have the same number: {dup[:3]}")
    if last - first + 1 != len(numbered):
        gaps = [n for n in range(first, last + 1) if n not in have]
        raise ValueError(f"frame images numbered {first}..{last} miss numbers {gaps[:5]}"
                         f"{' ...' if len(gaps) > 5 else ''}")
    return [name for _, name in numbered]


class FrameFolderReader:
    """``video_io.VideoReader``'s interface over a folder of frame images."""

    def __init__(self, folder: str):
        self.path = folder
        try:
            self._names = list_frames(folder)
        except (ValueError, OSError) as e:
            raise VideoDecodeError(folder, str(e)) from None
        self._size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self._names)

    def fps(self) -> float:
        return 0.0  # a folder of images does not say

    def frame_size(self) -> tuple[int, int]:
        """``(height, width)`` of frame 0, from its header (PIL reads no pixels for this)."""
        if self._size is None:
            try:
                with Image.open(os.path.join(self.path, self._names[0])) as im:
                    self._size = (im.height, im.width)
            except Exception as e:
                raise VideoDecodeError(self.path, f"cannot read {self._names[0]} ({type(e).__name__}: {e})") \
                    from None
        return self._size

    def get_batch(self, indices: Sequence[int], region: Region | None = None) -> np.ndarray:
        """``uint8 [len(indices), H, W, 3]`` RGB, only ``region=(top, left, h, w)`` of each frame if given; each
        distinct frame is decoded once."""
        idx = check_indices(self.path, indices, len(self))
        size = self.frame_size()
        top, left, h, w = (0, 0, *size) if region is None else check_region(self.path, region, *size)
        out = np.empty((len(idx), h, w, 3), np.uint8)
        first: dict[int, int] = {}
        for k, i in enumerate(idx):
            if i in first:
                out[k] = out[first[i]]
                continue
            frame = self._decode(i)
            if frame.shape[:2] != size:
                raise VideoDecodeError(self.path, f"{self._names[i]} is {frame.shape[0]}x{frame.shape[1]}, not "
                                                  f"{size[0]}x{size[1]} like {self._names[0]}")
            out[k] = frame[top:top + h, left:left + w]
            first[i] = k
        return out

    def _decode(self, i: int) -> np.ndarray:
        """Frame ``i`` as ``uint8 [H, W, 3]`` RGB (grey and palette images converted, alpha dropped; 16-bit PNGs
        reduced to their high byte: stored into uint8 as they come, they wrapped around)."""
        name = self._names[i]
        try:
            image = decode_image(read_file(os.path.join(self.path, name)), mode=ImageReadMode.RGB)
            if image.dtype != torch.uint8:  # torchvision >= 0.21 decodes 16-bit PNGs as uint16
                image = (image.to(torch.int32) >> (8 * image.element_size() - 8)).to(torch.uint8)
            return image.permute(1, 2, 0).numpy()
        except Exception as e:  # torchvision's RuntimeError on a missing, unreadable or corrupt file
            raise VideoDecodeError(self.path, f"cannot decode {name} ({type(e).__name__}: {e})") from None

    def close(self) -> None:
        pass
