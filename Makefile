# vgg-onnx: every target installs what it needs into the Python that PYTHON names
# (default python3, so an active virtualenv is used).
PYTHON ?= python3
MODEL ?= D
WEIGHTS ?=
OUT ?= models/vgg_$(MODEL).onnx
DATA ?=
EPOCHS ?= 74
TRAIN_ARGS ?=
TORCHVISION_VENV ?= .venv-torchvision

# one stamp per interpreter, remade when the package's requirements change
PYID := $(shell $(PYTHON) -c "import sys, hashlib; print(hashlib.md5(sys.prefix.encode()).hexdigest()[:10])" 2>/dev/null)
STAMP := .make/installed-$(PYID)
VGG := $(PYTHON) -m vgg_onnx

.PHONY: install test export demo train bench torchvision-env host-deps clean help

help:
	@echo "make demo | make test | make export MODEL=D [WEIGHTS=file] [OUT=file] | make train MODEL=A DATA=dir"
	@echo "make install | make bench | make torchvision-env | make host-deps | make clean"

$(STAMP): pyproject.toml
	@test -n "$(PYID)" || { echo "make: $(PYTHON) not found (set PYTHON=...)"; exit 2; }
	# torch 2.13.0 first: here a CPU wheel on local disk (a bare torch would pull a multi-GB CUDA build)
	$(PYTHON) -m pip install --quiet "torch==2.13.0"
	$(PYTHON) -m pip install --quiet -e ".[all,dev]"
	@mkdir -p .make && touch $@

install:
	@rm -f $(STAMP)
	@$(MAKE) --no-print-directory $(STAMP)

# torchvision exists here only as 0.29.1 paired with torch 2.14.1 (a CUDA build): it lives in its
# own virtualenv, used by the torchvision compatibility test alone, so the main install stays light.
$(TORCHVISION_VENV)/.ready:
	$(PYTHON) -m venv $(TORCHVISION_VENV)
	$(TORCHVISION_VENV)/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	@touch $@

torchvision-env: $(TORCHVISION_VENV)/.ready

# the C++ and Node.js hosts' system packages (Debian; installed when we are root) and npm packages;
# without them the host tests skip (CI=true makes them fail instead)
HOST_APT := libopencv-dev nlohmann-json3-dev cmake g++
host-deps:
	@if command -v dpkg >/dev/null && ! dpkg -s $(HOST_APT) >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(HOST_APT) >/dev/null; \
		else echo "make host-deps: as root, apt-get install $(HOST_APT) (for the C++ host)"; fi; fi
	@if command -v npm >/dev/null; then cd runtime/node && npm install --ignore-scripts --no-audit --no-fund --silent; \
		else echo "make host-deps: npm not found (for the Node.js host)"; fi

test: $(STAMP) torchvision-env host-deps
	VGG_ONNX_TORCHVISION_PYTHON=$(TORCHVISION_VENV)/bin/python $(PYTHON) -m pytest -q

export: $(STAMP)
	$(VGG) export --config $(MODEL) $(if $(WEIGHTS),--weights $(WEIGHTS)) --out $(OUT)

demo: $(STAMP)
	$(VGG) export --config D $(if $(WEIGHTS),--weights $(WEIGHTS)) --out models/vgg_D.onnx
	$(VGG) infer samples/ --model models/vgg_D.onnx --scales 256,384,512 --method both

train: $(STAMP)
	@test -n "$(DATA)" || { echo "make train: set DATA=folder with train/ and val/"; exit 2; }
	$(VGG) train --config $(MODEL) --data $(DATA) --out runs/$(MODEL) --epochs $(EPOCHS) $(if $(RESUME),--resume) $(TRAIN_ARGS)

bench: $(STAMP)
	$(VGG) bench --model $(OUT) --scales 256,384,512 --images ../shared/data/imagenet-samples --limit 8

clean:
	rm -rf .make build *.egg-info .pytest_cache models runtime/cpp/build

# The paper's findings in miniature (docs/reproduction.md). BUDGET=quick: tiny nets, 8 training images
# per class, 1 epoch, a few minutes, report in STUDY_WORK/reproduction.md; BUDGET=full: the study itself
# (CPU hours; resumable: run it again after an interruption), report in docs/reproduction.md.
BUDGET ?= quick
STUDY_DATA ?= ../shared/data/imagenette
STUDY_WORK ?= runs/study-$(BUDGET)
.PHONY: reproduce
reproduce: $(STAMP)
	$(VGG).train.study --budget $(BUDGET) --data $(STUDY_DATA) --work $(STUDY_WORK) \
		$(if $(filter full,$(BUDGET)),--report docs/reproduction.md)
