# slimctl: the demo, the tests and the paper's CIFAR reproductions.
#   make demo                    three stages on the bundled digits, a few minutes on a CPU
#   make test                    the test suite (what CI runs)
#   make cifar10-vgg19           sparse-train → prune 0.7 → finetune (the paper's Table 1 row)
#   make cifar10-vgg19-baseline  the same network trained without the sparsity term
#   make multipass ARCH=vgg19 DATASET=cifar10 PASSES=3 RATIO=0.3
#   make imagenet-resnet50 DATA=/data/imagenet   a pretrained torchvision ResNet-50, slimmed
# RUNS= and DATA= choose where runs and data sets live; SET="train.epochs=2 data.subset=512" adds
# config overrides to every training stage (smoke runs); RECALIBRATE=2000 re-estimates the BN
# statistics of every pruned model on that many training images (prune/sweep --recalibrate).
# Every stage is incremental: a finished stage (marked by a .done file) is not re-run, and an
# interrupted one resumes from its last.pt.

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SLIMCTL := $(BIN)/slimctl
RUNS ?= runs
DATA ?= data
DEMO_RATIO ?= 0.6
RECALIBRATE ?= 0

.PHONY: install demo test clean table multipass
.DELETE_ON_ERROR:
.SECONDARY:  # keep pruned-*.pt: they are results, not temporary files

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

demo: install
	$(SLIMCTL) sparse-train -c configs/demo.yaml -o $(RUNS)/demo/sparse --force
	$(SLIMCTL) sweep $(RUNS)/demo/sparse/best.pt --ratios 0.3,0.5,0.6,0.7,0.8,0.9 --png $(RUNS)/demo/sweep.png
	$(SLIMCTL) prune $(RUNS)/demo/sparse/best.pt --ratio $(DEMO_RATIO) -o $(RUNS)/demo/pruned.pt --force
	$(SLIMCTL) finetune $(RUNS)/demo/pruned.pt -c configs/demo.yaml -o $(RUNS)/demo/finetune --force
	$(SLIMCTL) report $(RUNS)/demo/finetune/best.pt

# The suite in TEST_WORKERS processes (pytest-xdist), one torch thread each: the tests are many
# small models, so processes use the cores better than torch's threads do.
# worksteal: an idle worker takes queued tests from the busy one, so a few long tests do not leave
# one core idle at the end.
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

table: install
	$(BIN)/python scripts/collect_results.py $(RUNS) -o $(RUNS)/table.md

clean:
	rm -rf $(RUNS)/demo build *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# ---------------------------------------------------------------- the paper's CIFAR recipes
# $(call train_args,RUN_DIR): data location, and --resume when an interrupted run left a last.pt.
train_args = --set data.root=$(DATA) $(foreach s,$(SET),--set $(s)) $(if $(wildcard $(1)/last.pt),--resume,--force)

# $(1) = dataset, $(2) = arch, $(3) = pruning ratios. Run folder: $(RUNS)/$(1)-$(2)/.
define RECIPE
$(1)-$(2): $(foreach r,$(3),$(RUNS)/$(1)-$(2)/finetune-$(r)/.done)
	$(SLIMCTL) report $(RUNS)/$(1)-$(2)/finetune-$(lastword $(3))/best.pt
$(1)-$(2)-baseline: $(RUNS)/$(1)-$(2)/baseline/.done
.PHONY: $(1)-$(2) $(1)-$(2)-baseline

$(RUNS)/$(1)-$(2)/sparse/.done: | install
	$(SLIMCTL) sparse-train -c configs/$(1)_$(2).yaml -o $$(@D) $$(call train_args,$$(@D))
	touch $$@

$(RUNS)/$(1)-$(2)/baseline/.done: | install
	$(SLIMCTL) sparse-train -c configs/$(1)_$(2).yaml -o $$(@D) --set train.sparsity=0 --set train.sparsity_budget=null $$(call train_args,$$(@D))
	touch $$@

# Top-1 right after pruning at ratios 0.1 … 0.9, sparse vs baseline, compensated vs literal removal.
$(RUNS)/$(1)-$(2)/sweep.json: $(RUNS)/$(1)-$(2)/sparse/.done $(RUNS)/$(1)-$(2)/baseline/.done
	$(SLIMCTL) sweep $(RUNS)/$(1)-$(2)/sparse/best.pt --compare $(RUNS)/$(1)-$(2)/baseline/best.pt \
	  --data-root $(DATA) --recalibrate $(RECALIBRATE) --png $(RUNS)/$(1)-$(2)/sweep.png --json > $$@.tmp && mv $$@.tmp $$@

$(RUNS)/$(1)-$(2)/pruned-%.pt: $(RUNS)/$(1)-$(2)/sparse/.done
	$(SLIMCTL) prune $(RUNS)/$(1)-$(2)/sparse/best.pt --ratio $$* -o $$@ --data-root $(DATA) \
	  --recalibrate $(RECALIBRATE) --force

# Resume an interrupted fine-tune only if its pruned input has not been remade since.
$(RUNS)/$(1)-$(2)/finetune-%/.done: $(RUNS)/$(1)-$(2)/pruned-%.pt
	$(SLIMCTL) finetune $$< -c configs/$(1)_$(2).yaml -o $$(@D) --set data.root=$(DATA) \
	  $(foreach s,$(SET),--set $(s)) $$$$( [ $$(@D)/last.pt -nt $$< ] && echo --resume || echo --force )
	touch $$@

# Is the slimmed model worth it? The same architecture from scratch (Scratch-E: the same epochs;
# Scratch-B: the unpruned model's compute, at most 2×), and the fine-tune with distillation from the
# sparse model (finetune.distill.alpha=0.5, T = 4).
$(1)-$(2)-scratch-e: $(foreach r,$(3),$(RUNS)/$(1)-$(2)/scratch-e-$(r)/.done)
$(1)-$(2)-scratch-b: $(foreach r,$(3),$(RUNS)/$(1)-$(2)/scratch-b-$(r)/.done)
$(1)-$(2)-distill: $(foreach r,$(3),$(RUNS)/$(1)-$(2)/finetune-kd-$(r)/.done)
.PHONY: $(1)-$(2)-scratch-e $(1)-$(2)-scratch-b $(1)-$(2)-distill

$(RUNS)/$(1)-$(2)/scratch-e-%/.done: $(RUNS)/$(1)-$(2)/pruned-%.pt
	$(SLIMCTL) scratch $$< -c configs/$(1)_$(2).yaml --budget epochs -o $$(@D) $$(call train_args,$$(@D))
	touch $$@

$(RUNS)/$(1)-$(2)/scratch-b-%/.done: $(RUNS)/$(1)-$(2)/pruned-%.pt
	$(SLIMCTL) scratch $$< -c configs/$(1)_$(2).yaml --budget flops -o $$(@D) $$(call train_args,$$(@D))
	touch $$@

$(RUNS)/$(1)-$(2)/finetune-kd-%/.done: $(RUNS)/$(1)-$(2)/pruned-%.pt
	$(SLIMCTL) finetune $$< -c configs/$(1)_$(2).yaml -o $$(@D) --set finetune.distill.alpha=0.5 \
	  $$(call train_args,$$(@D))
	touch $$@
endef

$(eval $(call RECIPE,cifar10,vgg19,0.7))
$(eval $(call RECIPE,cifar100,vgg19,0.5))
$(eval $(call RECIPE,cifar10,resnet164,0.4 0.6))
$(eval $(call RECIPE,cifar100,resnet164,0.4 0.6))
$(eval $(call RECIPE,cifar10,densenet40,0.4 0.7))
$(eval $(call RECIPE,cifar100,densenet40,0.4 0.7))

# A pretrained torchvision ResNet-50 on ImageNet-style folders (DATA=/path/holding/train+val).
$(eval $(call RECIPE,imagenet,resnet50,0.3))

# CPU-scale reproductions on real CIFAR-10 (shortened schedules; see the configs).
$(eval $(call RECIPE,cifar10,vgg19_w025,0.5 0.7))
$(eval $(call RECIPE,cifar10,vgg19_w025_polar,0.7))
$(eval $(call RECIPE,cifar10,preresnet56,0.4 0.6))

# $(1) = recipe folder name, $(2) = its ratios: the plots of one recipe (|γ| histograms, test error
# per epoch), after every stage (so `make -j2` cannot draw them early).
define PLOTS
$(RUNS)/$(1)/plots.done: $(RUNS)/$(1)/baseline/.done $(RUNS)/$(1)/sparse/.done $(foreach r,$(2),$(RUNS)/$(1)/finetune-$(r)/.done)
	$(BIN)/python scripts/plot_runs.py $(RUNS)/$(1)
	touch $$@
endef
$(eval $(call PLOTS,cifar10-vgg19_w025,0.5 0.7))
$(eval $(call PLOTS,cifar10-preresnet56,0.4 0.6))

cpu-repro-vgg: cifar10-vgg19_w025-baseline cifar10-vgg19_w025 $(RUNS)/cifar10-vgg19_w025/plots.done \
  $(RUNS)/cifar10-vgg19_w025/sweep.json
cpu-repro-resnet: cifar10-preresnet56-baseline cifar10-preresnet56 $(RUNS)/cifar10-preresnet56/plots.done \
  $(RUNS)/cifar10-preresnet56/sweep.json
cpu-repro: cpu-repro-vgg cpu-repro-resnet
	$(MAKE) table
.PHONY: cpu-repro cpu-repro-vgg cpu-repro-resnet

# The paper's iterative scheme: prune RATIO of the remaining channels, fine-tune, repeat.
# Starts from $(RUNS)/$(DATASET)-$(ARCH)/sparse (run `make $(DATASET)-$(ARCH)` or its sparse stage first).
DATASET ?= cifar10
ARCH ?= vgg19
PASSES ?= 3
RATIO ?= 0.3
multipass: $(RUNS)/$(DATASET)-$(ARCH)/sparse/.done
	set -e; ckpt=$(RUNS)/$(DATASET)-$(ARCH)/sparse/best.pt; \
	for pass in $$(seq 1 $(PASSES)); do \
	  dir=$(RUNS)/$(DATASET)-$(ARCH)/multipass-$(RATIO)/pass$$pass; \
	  if [ ! -f $$dir/.done ]; then \
	    $(SLIMCTL) prune $$ckpt --ratio $(RATIO) -o $$dir/pruned.pt --data-root $(DATA) --force; \
	    $(SLIMCTL) finetune $$dir/pruned.pt -c configs/$(DATASET)_$(ARCH).yaml -o $$dir/finetune \
	      --set data.root=$(DATA) $(foreach s,$(SET),--set $(s)) \
	      $$( [ -f $$dir/finetune/last.pt ] && echo --resume || echo --force ); \
	    touch $$dir/.done; \
	  fi; \
	  ckpt=$$dir/finetune/best.pt; \
	done; \
	$(SLIMCTL) report $$ckpt
