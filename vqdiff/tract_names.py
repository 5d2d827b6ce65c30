"""The names white-matter bundles go by in the field's atlases and pipelines, one family per tract.

A file named ``Left_Corticospinal.trk`` (AFQ), ``CST_left.trk`` (TractSeg), ``sub-01__PYT_L.trk``
(TractoInferno) or ``AF_L.trk`` (RecoBundles) says which bundle it holds. `tract_family` reads that:
the family's id and full name, or None when the name says nothing known. Registration uses it twice
(`vqdiff.registration.resolve_hint`): a name of a family the model has a template of narrows the
recognition to those templates (so ``Left_Corticospinal`` is matched to ``PYT_L`` without a model
alias), and a name of a family it has none of (``Left_Cingulum_Cingulate`` for a model trained on
subject01's 12 bundles) makes the bundle unknown whatever its residual: on the AFQ cross-subject
bundles the residual alone let 4 of the 13 bundles without a counterpart pass as known.

Matching is on whole words of the name (`tokens`: ``CamelCase``, ``snake_case``, digits split). Of
the families whose spellings occur, a part of the corpus callosum beats the whole (``CC_Fr_1``,
``Genu_of_Corpus_Callosum``: the frontal part), then the longest spelling wins (``Superior_Thalamic_
Radiation``: STR, not ATR). Sides (``L``, ``left``, ``lh``, ...) are left to the caller, BIDS
identifiers to `name_words`. Left out: spellings that are mostly other things in file names (``fa``:
fractional anisotropy; ``or``; a bare ``cc``, e.g. Cam-CAN's subject ids), and TractSeg's
striatal / thalamic projection bundles (``ST_*``, ``T_*``), which then say nothing.
"""

from __future__ import annotations

import re

# family id -> (full name, spellings as word sequences); longer spellings are tried first
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "PYT": ("pyramidal / corticospinal tract", ("pyt", "pyramidal", "cst", "corticospinal", "cortico spinal")),
    "FPT": ("fronto-pontine tract", ("fpt", "fronto pontine", "frontopontine")),
    "POPT": ("parieto-occipital pontine tract", ("popt", "parieto occipital pontine", "parietooccipital pontine")),
    "IFOF": ("inferior fronto-occipital fasciculus", ("ifof", "ifo", "inferior fronto occipital",
                                                      "inferior frontooccipital")),
    "ILF": ("inferior longitudinal fasciculus", ("ilf", "inferior longitudinal")),
    "MCP": ("middle cerebellar peduncle", ("mcp", "middle cerebellar peduncle", "middle cerebellar")),
    "CC_FR": ("frontal corpus callosum (forceps minor)", ("cc fr", "forceps minor", "fmi", "forceps anterior",
                                                          "callosum frontal", "genu")),
    "CC_OC": ("occipital corpus callosum (forceps major)", ("cc oc", "forceps major", "fma", "forceps posterior",
                                                            "callosum occipital", "splenium")),
    "CC_PA": ("parietal corpus callosum", ("cc pa", "callosum parietal")),
    "CC_PR_PO": ("pre/post-central corpus callosum", ("cc pr po", "cc pr", "cc po")),
    "CC": ("corpus callosum", ("callosum", "corpus callosum")),
    "AF": ("arcuate fasciculus", ("af", "arc", "arcuate")),
    "SLF": ("superior longitudinal fasciculus", ("slf", "superior longitudinal")),
    "MLF": ("middle longitudinal fasciculus", ("mlf", "mdlf", "md lf", "middle longitudinal")),
    "UF": ("uncinate fasciculus", ("uf", "unc", "uncinate")),
    "CG": ("cingulum", ("cg", "cgc", "cgh", "cingulum", "cingulate")),
    "ATR": ("anterior thalamic radiation", ("atr", "thalamic radiation", "anterior thalamic",
                                            "anterior thalamic radiation")),
    "PTR": ("posterior thalamic radiation", ("ptr", "posterior thalamic", "posterior thalamic radiation")),
    "OR": ("optic radiation", ("optic radiation", "optic", "or ml")),
    "FX": ("fornix", ("fx", "fornix")),
    "ICP": ("inferior cerebellar peduncle", ("icp", "inferior cerebellar")),
    "SCP": ("superior cerebellar peduncle", ("scp", "superior cerebellar")),
    "AC": ("anterior commissure", ("anterior commissure",)),
    "PC": ("posterior commissure", ("posterior commissure",)),
    "FAT": ("frontal aslant tract", ("fat", "frontal aslant", "aslant")),
    "STR": ("superior thalamic radiation", ("str", "superior thalamic", "superior thalamic radiation")),
}

_SPELLINGS = sorted(((tuple(sp.split()), fam) for fam, (_, sps) in FAMILIES.items() for sp in sps),
                    key=lambda e: -len(e[0]))  # longest first: the most specific spelling wins


_IDENTIFIERS = re.compile(r"(?<![A-Za-z0-9])(sub|ses|run|acq|rec|echo)-[A-Za-z0-9]+")


def tokens(text: str) -> list[str]:
    """Lower-case words of a name: ``"sub-01__Left_IFOF"`` -> ``["sub", "01", "left", "ifof"]``."""
    parts = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", str(text))
    return [p.lower() for p in parts]


def name_words(name: str) -> list[str]:
    """`tokens` of a file name without its BIDS identifiers (``sub-``, ``ses-``, ``run-``, ``acq-``,
    ``rec-``, ``echo-`` and their values): Cam-CAN's ``sub-CC110033`` names a subject, not the
    corpus callosum."""
    return tokens(_IDENTIFIERS.sub(" ", str(name)))


def contains_words(words: list[str], part: tuple[str, ...]) -> bool:
    """Whether ``part`` occurs in ``words`` as consecutive words."""
    n = len(part)
    return any(tuple(words[i:i + n]) == part for i in range(len(words) - n + 1))


def tract_family(words: list[str]) -> tuple[str, str] | None:
    """(family id, full name) that the words of a name spell (module doc: parts of the corpus callosum
    first, then the longest spelling), or None."""
    found = [fam for spelling, fam in _SPELLINGS if contains_words(words, spelling)]  # longest first
    if not found:
        return None
    fam = next((f for f in found if f.startswith("CC_")), found[0])
    return fam, FAMILIES[fam][0]
