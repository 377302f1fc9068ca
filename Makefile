# The two commands of the README: `make run` and `make test`. Each installs
# what is missing first (.ci/setup skips what is already there).
SHELL := /bin/bash
# wasm-opt from npm's binaryen (never Debian's) and the cargo tools.
export PATH := $(CURDIR)/target/tools/node_modules/.bin:$(HOME)/.cargo/bin:$(PATH)

.PHONY: run test setup build dev sim fmt lint unit e2e

## Serve taskwire at http://127.0.0.1:3000 with the embedded simulator.
run:
	.ci/setup build
	cargo leptos build --release --precompress
	./target/release/taskwire

## Every test: format, lints (server and wasm), unit + integration, end-to-end.
test: setup fmt lint unit e2e

setup:
	.ci/setup

build:
	.ci/setup build
	cargo leptos build --release --precompress

## Development: rebuilds and reloads the page on every edit.
dev:
	.ci/setup build
	cargo leptos watch

## The task-service simulator on its own, for `--backend http://127.0.0.1:4000`.
sim: build
	./target/release/taskwire sim --listen 127.0.0.1:4000

fmt:
	cargo fmt --all -- --check

lint:
	cargo clippy -p app -p server --all-targets -- -D warnings
	cargo clippy -p app -p frontend --all-targets --target wasm32-unknown-unknown -- -D warnings

unit:
	cargo test -p app -p server

e2e:
	cargo leptos build --release --precompress
	cd end2end && npx playwright test
