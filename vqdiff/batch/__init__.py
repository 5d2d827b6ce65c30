"""Batch encoding (and decoding) of folder trees of bundles: local by default, sharded, on Ray.

- `vqdiff.batch.tasks`: which file becomes which output, shards, the index;
- `vqdiff.batch.stages`: prepare -> engine (`Batcher`) -> finish, around the codec core;
- `vqdiff.batch.local` / `vqdiff.batch.ray_runner`: where the stages run;
- `vqdiff.batch.job`: `run_batch`, the job (journal, index, summary);
- `vqdiff.batch.cli_encode` / `cli_decode`: ``vqdiff-encode-batch`` / ``vqdiff-decode-batch``.

Nothing is imported here.
"""
