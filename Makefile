# vqdiff: the two set-up commands of the README are `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
SHARED ?= ../shared/data
OUT    ?= out
# The CPU build of torch (a local wheel on our machines); GPU users install their own torch first.
TORCH  ?= torch==2.13.0

.PHONY: install serve run test test-fast lint default-model table1 authors table1-authors wheel bento bento-lean bento-gpu container-check bench-service clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,export,eval,analysis,serve,ray]"
	touch $@

install: $(VENV)/.installed

PORT ?= 3000
# Main job: the HTTP service with the bundled default model (VQDIFF_MODEL=<dir> or VQDIFF_MODEL_TAG=<tag>).
serve: install
	BENTOML_DO_NOT_TRACK=True $(BIN)/bentoml serve --port $(PORT)

# The bentos install the vqdiff wheel; the sources are not copied in. scripts/build_bento.py fills each
# bentofile's packages from pyproject.toml and its wheels (vqdiff; the CPU bento also ships the CPU torch
# wheel, $(TORCH), so that its image builds where only PyPI is reachable; TORCH_WHEEL=<file> names one).
wheel: install
	rm -f dist/vqdiff-*.whl
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w dist .

bento: install
	TORCH="$(TORCH)" $(BIN)/python scripts/build_bento.py cpu

# No torch: an export directory (EXPORT=<dir>, default: models/default exported to build/) on ONNX Runtime.
EXPORT ?=
bento-lean: install
	$(BIN)/python scripts/build_bento.py lean $(if $(EXPORT),--export $(EXPORT))

# The bento's config records the GPU shape (one worker, resources gpu: 1)
bento-gpu: install
	$(BIN)/python scripts/build_bento.py gpu

# Build, run and check the images (docker or podman; README "Containers"): CONTAINER_ARGS=--variant lean,
# --gpu, --ca-certs /usr/local/share/ca-certificates (a proxy's CA), --keep. Minutes and GBs: not in CI.
CONTAINER_ARGS ?=
container-check: install
	bash scripts/container-check.sh $(CONTAINER_ARGS)

bench-service: install
	$(BIN)/python benchmarks/bench_service.py --threads 1

# The GPU check (docs/engines.md): `make gpu-check` on a CUDA machine (after `scripts/gpu-check.sh
# --fetch-wheels` where pip reaches PyPI); GPU_CHECK_ARGS=--dry-run runs it on the CPU, as CI does.
GPU_CHECK_ARGS ?=
gpu-check:
	bash scripts/gpu-check.sh $(GPU_CHECK_ARGS)

# Encode -> decode round trip of a real bundle with the bundled default model.
run: install
	mkdir -p $(OUT)
	$(BIN)/vqdiff-roundtrip $(SHARED)/subject01/IFOF_R.trk $(OUT)/IFOF_R.vqlat $(OUT)/IFOF_R_recon.trk -f

test: install
	$(BIN)/python -m pytest -q

# The unit layer (under 3 minutes on 2 cores): everything but the end-to-end modules (a real `bentoml
# serve`, batch jobs, training runs, exports and the engine selection, the default model's evaluations,
# the authors' weights, GPU) and the bento builds. `make test` runs them all.
FAST_SKIP ?= test_service.py test_service_auth.py test_service_auto.py test_batch.py test_training.py \
  test_resume_kill.py test_export.py test_default_model.py test_authors.py test_gpu.py test_checkpoint_latents_api.py \
  test_bentos.py
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not gpu and not tensorrt" $(addprefix --ignore=tests/,$(FAST_SKIP))

lint: install
	$(BIN)/ruff check .

# Rebuild the bundled default model (models/default/MODEL_CARD.md): the authors' VQ-Diff fine-tuned on
# subject01's training split with augmentations for other subjects and spaces; best/ chosen on the
# validation split; reported on the test split and on the cross-subject set, beside the authors' VQ-Diff
# and AE. Re-running resumes the training run in runs/default where it stopped.
DEFAULT_AUG ?= --rotate-deg 10 --scale-range 0.9 1.1 --translate-mm 5 --aniso-scale 0.05 --shear 0.03 \
  --mirror-prob 0.5 --elastic-mm 2 --elastic-wavelength-mm 40 --jitter-mm 0.2
DEFAULT_TRAIN_ARGS ?= --steps 2000 --batch-size 32 --lr 3e-4 --schedule onecycle --eval-every 250 --seed 0 \
  --threads 1 --precision fp32 $(DEFAULT_AUG)
CROSS ?= $(SHARED)/crosssubject/afq_browser
DEFAULT_SELECTION ?= Selection: between fine-tuning with and without augmentation (compared at step 250) on this \
  cross-subject set, so its figures here are validation figures, not an independent test.
default-model: install authors
	test -f runs/split-data/manifest.json || \
	  $(BIN)/vqdiff-prepare $(SHARED)/subject01 runs/split-data --val-fraction 0.1 --test-fraction 0.1 --seed 0
	$(BIN)/vqdiff-train runs/split-data runs/default --init-from $(OUT)/authors-vq_diff $(DEFAULT_TRAIN_ARGS) --no-progress
	$(BIN)/vqdiff-evaluate runs/default/best runs/split-data runs/default-eval -f --split test \
	  --paper-table $(SHARED)/paper_buan_table.csv
	$(BIN)/vqdiff-evaluate runs/default/best $(CROSS) runs/default-cross -f --cross-subject
	for k in vq_diff ae; do \
	  $(BIN)/vqdiff-evaluate $(OUT)/authors-$$k $(CROSS) $(OUT)/cross-authors-$$k -f --cross-subject || exit 1; \
	done
	$(BIN)/python -m vqdiff.training.model_card runs/default runs/default-eval models/default -f \
	  --cross-subject runs/default-cross --compare authors-vq_diff=$(OUT)/cross-authors-vq_diff \
	  authors-ae=$(OUT)/cross-authors-ae --selection "$(DEFAULT_SELECTION)"

# The paper's Table 1 on our data (docs/table1.md, part 2): every kind, one recipe, the same
# train / validation / test split of subject01; best/ (chosen on validation) reported on test.
# Resumable: re-running continues each kind's run where it stopped.
TABLE1_ARGS ?= --steps 3000 --batch-size 32 --lr 2e-3 --eval-every 500 --seed 0 --threads 1
TABLE1_KINDS ?= ae vae vq vq_ema vq_diff
table1: install
	test -f runs/split-data/manifest.json || \
	  $(BIN)/vqdiff-prepare $(SHARED)/subject01 runs/split-data --val-fraction 0.1 --test-fraction 0.1 --seed 0
	for k in $(TABLE1_KINDS); do \
	  $(BIN)/vqdiff-train runs/split-data runs/table1/$$k --kind $$k $(TABLE1_ARGS) --no-progress && \
	  $(BIN)/vqdiff-evaluate runs/table1/$$k/best runs/split-data runs/table1/$$k-eval -f --no-figures --split test \
	    --paper-table $(SHARED)/paper_buan_table.csv || exit 1; \
	done
	$(BIN)/python -m vqdiff.training.table1 runs/table1 runs/table1/table1.md --paper-table $(SHARED)/paper_buan_table.csv

# The paper authors' released weights as checkpoints (../shared/authors; MIT, see their MODEL_CARD.md).
AUTHORS ?= ../shared/authors
authors: install
	for k in ae vq vq_ema vq_diff; do \
	  $(BIN)/vqdiff-import-authors $(AUTHORS)/$$k.pt $(OUT)/authors-$$k --kind $$k --templates $(SHARED)/subject01 -f \
	    > /dev/null || exit 1; \
	done

# Table 1 with the authors' weights on subject01, paper protocol beside ours (docs/table1.md, part 1).
table1-authors: authors
	$(BIN)/python -m vqdiff.training.paper_protocol $(SHARED)/subject01 $(OUT)/table1-authors \
	  $(OUT)/authors-ae $(OUT)/authors-vq $(OUT)/authors-vq_ema $(OUT)/authors-vq_diff \
	  --paper-table $(SHARED)/paper_buan_table.csv

clean:
	rm -rf $(OUT) runs dist .pytest_cache .ruff_cache
