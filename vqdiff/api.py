"""The public Python API, ``from vqdiff.api import Codec, encode, decode``: the codec core
(`vqdiff.codec`) under its documented name. Nothing is defined here.

>>> from vqdiff.api import Codec
>>> codec = Codec.from_checkpoint("models/default")          # or Codec.default()
>>> lat = codec.encode_file("IFOF_R.trk")                    # Latents, lat.save("IFOF_R.vqlat")
>>> bundle = codec.decode(lat)                               # same order, direction and space
"""

from __future__ import annotations

from .codec import Codec, decode, default_model_dir, encode

__all__ = ["Codec", "decode", "default_model_dir", "encode"]
