# Two commands: `make demo` and `make test`. Both install what is missing first (Debian packages,
# the .venv virtualenv, the Python packages), so they work on a fresh Debian 12 machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# softhsm2/opensc/libengine-pkcs11-openssl: test cards; nginx: TLS terminator; redis-server: shared state;
# redis-sentinel: failover tests;
# chromium/libnss3-tools: browser tests; wrk: benchmarks; docker.io/mmdebstrap: the container image
# (`make image`, tests/test_image.py: a private dockerd and a base image made from Debian's packages).
DEBIAN_PACKAGES := softhsm2 opensc libengine-pkcs11-openssl redis-server redis-sentinel nginx chromium libnss3-tools wrk curl \
	docker.io mmdebstrap
# apache2/libapache2-mod-auth-openidc: the baseline the benchmarks compare with (bench/baselines.py); `make bench` only.
BENCH_PACKAGES := apache2 libapache2-mod-auth-openidc

.PHONY: demo test lint bench image image-stop deps debian-packages clean translations

demo: deps translations
	$(VENV)/bin/gateway demo

test: deps translations
	@# The image test's base (mmdebstrap, mostly downloads) is made meanwhile: ready when that test runs.
	$(PYTHON) deploy/image.py base --background
	$(PY) -m pytest -q -p no:cacheprovider
	$(VENV)/bin/ruff check gateway tests bench deploy
	$(VENV)/bin/mypy

lint: deps
	$(VENV)/bin/ruff check gateway tests bench deploy
	$(VENV)/bin/mypy

# The container image, built on a base made here from Debian's packages (no registry needed; deploy/image.py).
image: debian-packages
	$(PYTHON) deploy/image.py build

image-stop:
	$(PYTHON) deploy/image.py stop

bench: deps
	@$(MAKE) -s debian-packages DEBIAN_PACKAGES="$(BENCH_PACKAGES)"
	$(PY) -m pip install -q -e ".[test,bench]"
	$(PY) bench/servers.py
	$(PY) bench/proxy.py
	$(PY) bench/forward_auth.py
	$(PY) bench/decision.py
	$(PY) bench/capacity.py

# The e-CPS tests' second OpenID Connect provider (panva/oidc-provider on the machine's node 20 and npm),
# pinned by its package-lock.json; npm ci writes node_modules/.package-lock.json last.
OIDC_PROVIDER := tests/support/oidc_provider
OIDC_PROVIDER_STAMP := $(OIDC_PROVIDER)/node_modules/.package-lock.json

deps: debian-packages $(STAMP) $(OIDC_PROVIDER_STAMP)

$(OIDC_PROVIDER_STAMP): $(OIDC_PROVIDER)/package-lock.json $(OIDC_PROVIDER)/package.json
	npm ci --prefix $(OIDC_PROVIDER) --no-audit --no-fund --loglevel=error

# The page wording: gateway/translations/*/LC_MESSAGES/gateway.po, compiled to .mo (every pip build does it too).
CATALOGS := $(wildcard gateway/translations/*/LC_MESSAGES/gateway.po)
translations: $(CATALOGS:.po=.mo)

gateway/translations/%.mo: gateway/translations/%.po $(STAMP)
	$(VENV)/bin/pybabel -q compile -d gateway/translations -D gateway

debian-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

clean: image-stop
	rm -rf $(VENV) var build *.egg-info $(OIDC_PROVIDER)/node_modules
