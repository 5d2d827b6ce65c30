"""The public Python API, ``from vqdiff.api import Codec, encode, decode``: the codec core
(`vqdiff.codec`) under its documented name. Nothing is defined here.

>>> from vqdiff.api import Codec
>>> codec = Codec.from_checkpoint("models/default")          # or Codec.default()
>>> lat = codec.encode_file("IFOF_R.trk")                    # Latents, lat.save("IFOF_R.vqlat")
>>> bundle = codec.decode(lat)                               # same order, direction and space
>>> subject = codec.encode_file("sub-01.trx")                # a TRX with groups: Subject, one bundle per group
>>> whole = codec.decode(load_latents("sub-01.vqlat"), restore_points=True)   # groups, dps, dpv back
"""

from __future__ import annotations

from .codec import Codec, decode, default_model_dir, encode
from .subject import Subject, load_latents

__all__ = ["Codec", "Subject", "decode", "default_model_dir", "encode", "load_latents"]
