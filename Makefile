# vgg-onnx: every target installs what it needs into the Python that PYTHON names
# (default python3, so an active virtualenv is used).
PYTHON ?= python3
MODEL ?= D
WEIGHTS ?=
# the model file `make export` writes and `make bench` reads
MODEL_FILE ?= models/vgg_$(MODEL).onnx
# the images `make bench` runs on: the photos the repository ships, or any folder
IMAGES ?= samples/
DATA ?=
EPOCHS ?= 74
TRAIN_ARGS ?=
TORCHVISION_VENV ?= .venv-torchvision

# one stamp per interpreter, remade when the package's requirements change
PYID := $(shell $(PYTHON) -c "import sys, hashlib; print(hashlib.md5(sys.prefix.encode()).hexdigest()[:10])" 2>/dev/null)
STAMP := .make/installed-$(PYID)
VGG := $(PYTHON) -m vgg_onnx

.PHONY: install test export demo train bench web wheel torchvision-env host-deps clean help

help:
	@echo "make demo | make test | make export MODEL=D [WEIGHTS=file] [MODEL_FILE=file] | make train MODEL=A DATA=dir"
	@echo "make bench [MODEL_FILE=file] [IMAGES=dir] | make web [MODEL_FILE=file] [PORT=n] | make wheel | make install"
	@echo "make reproduce STUDY_DATA=imagenette [BUDGET=quick|full] | make torchvision-env"
	@echo "make host-deps | make clean"

$(STAMP): pyproject.toml
	@test -n "$(PYID)" || { echo "make: $(PYTHON) not found (set PYTHON=...)"; exit 2; }
	# torch 2.13.0 first: here a CPU wheel on local disk (a bare torch would pull a multi-GB CUDA build).
	# The pin picks the suite's torch, not a limit: pyproject.toml also admits 2.14, so the package can
	# share a venv with torchvision 0.29.1 (whose only build needs 2.14.1); <2.15 stops before untried releases.
	$(PYTHON) -m pip install --quiet "torch==2.13.0"
	$(PYTHON) -m pip install --quiet -e ".[all,dev,openvino]"  # openvino: its backend is tested too
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

# the C++, Node.js and browser hosts' system packages (Debian; installed when we are root) and npm
# packages (runtime/node; runtime/web: onnxruntime-web and playwright-core, which drives Debian's
# chromium in tests/test_web.py); without them the host tests skip (CI=true makes them fail instead)
HOST_APT := libopencv-dev nlohmann-json3-dev cmake g++ chromium
host-deps:
	@if command -v dpkg >/dev/null && ! dpkg -s $(HOST_APT) >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(HOST_APT) >/dev/null; \
		else echo "make host-deps: as root, apt-get install $(HOST_APT) (for the C++ and browser hosts)"; fi; fi
	@if command -v npm >/dev/null; then for host in runtime/node runtime/web; do \
		(cd $$host && npm install --ignore-scripts --no-audit --no-fund --silent) || exit 1; done; \
		else echo "make host-deps: npm not found (for the Node.js and browser hosts)"; fi

test: $(STAMP) torchvision-env host-deps
	VGG_ONNX_TORCHVISION_PYTHON=$(TORCHVISION_VENV)/bin/python $(PYTHON) -m pytest -q

export: $(STAMP)
	$(VGG) export --config $(MODEL) $(if $(WEIGHTS),--weights $(WEIGHTS)) --out $(MODEL_FILE)

# The demo's model is rebuilt only when it is missing, when the code that compiles it changed, or
# when WEIGHTS names other weights (recorded in a stamp rewritten only when its value changes).
DEMO_MODEL := models/vgg_D.onnx
DEMO_WEIGHTS_STAMP := .make/demo-weights
EXPORT_SOURCES := $(wildcard export/*.py train/model.py train/checkpoint.py vgg_onnx/*.py vgg_onnx/data/*)
$(shell mkdir -p .make && { echo '$(WEIGHTS)' | cmp -s - $(DEMO_WEIGHTS_STAMP) || echo '$(WEIGHTS)' > $(DEMO_WEIGHTS_STAMP); })

$(DEMO_MODEL): $(EXPORT_SOURCES) $(DEMO_WEIGHTS_STAMP) $(WEIGHTS) | $(STAMP)
	$(VGG) export --config D $(if $(WEIGHTS),--weights $(WEIGHTS)) --out $@

# dense evaluation at the model's three test scales: about 2 minutes on 2 CPU cores, export included
demo: $(DEMO_MODEL)
	$(VGG) infer samples/ --model $(DEMO_MODEL) --method dense
	@echo "next, the paper's full protocol (dense + 150 crops per image: about 15 times the work of dense):"
	@echo "  $(VGG) infer samples/ --model $(DEMO_MODEL) --method both"

train: $(STAMP)
	@test -n "$(DATA)" || { echo "make train: set DATA=folder with train/ and val/"; exit 2; }
	$(VGG) train --config $(MODEL) --data $(DATA) --out runs/$(MODEL) --epochs $(EPOCHS) $(if $(RESUME),--resume) $(TRAIN_ARGS)

bench: $(STAMP)
	@test -f $(MODEL_FILE) || { echo "make bench: $(MODEL_FILE) is missing: make export MODEL=$(MODEL) first"; exit 2; }
	$(VGG) bench --model $(MODEL_FILE) --scales 256,384,512 --images $(IMAGES) --limit 8

# the browser host: a page on http://127.0.0.1:PORT/ that classifies images with MODEL_FILE in the
# browser (onnxruntime-web from runtime/web's npm packages, installed here when missing)
PORT ?= 8000
web: $(STAMP)
	@test -f $(MODEL_FILE) || { echo "make web: $(MODEL_FILE) is missing: make export MODEL=$(MODEL) first"; exit 2; }
	@test -d runtime/web/node_modules/onnxruntime-web || (cd runtime/web && npm install --ignore-scripts --no-audit --no-fund --silent)
	$(VGG) web --model $(MODEL_FILE) --port $(PORT)

# a wheel of the package in dist/, to install elsewhere: pip install 'dist/vgg_onnx-VERSION-py3-none-any.whl[runtime]'
wheel:
	$(PYTHON) -m pip wheel --no-deps --quiet --wheel-dir dist .
	@rm -rf build
	@ls dist/vgg_onnx-*.whl

clean:
	rm -rf .make build dist *.egg-info .pytest_cache models runtime/cpp/build

# The paper's findings in miniature (docs/reproduction.md) on Imagenette (STUDY_DATA: a folder with
# train/<synset>/ and val/<synset>/). BUDGET=quick: tiny nets, 8 training images per class, 1 epoch, a
# few minutes, report in STUDY_WORK/reproduction.md; BUDGET=full: the study itself (CPU hours;
# resumable: run it again after an interruption), report in docs/reproduction.md.
BUDGET ?= quick
STUDY_DATA ?=
STUDY_WORK ?= runs/study-$(BUDGET)
.PHONY: reproduce
reproduce: $(STAMP)
	@test -n "$(STUDY_DATA)" || { echo "make reproduce: set STUDY_DATA=folder with train/ and val/ (Imagenette)"; exit 2; }
	$(VGG).train.study --budget $(BUDGET) --data $(STUDY_DATA) --work $(STUDY_WORK) \
		$(if $(filter full,$(BUDGET)),--report docs/reproduction.md)
