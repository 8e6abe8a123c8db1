# STP house checks. `just --list` shows the recipes.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Formatting, lints and every host test (what CI runs before the VM stage).
default: ci

# Check formatting (no changes).
fmt-check:
    cargo fmt --all -- --check

# Reformat the workspace.
fmt:
    cargo fmt --all

# Lints, warnings are errors.
clippy:
    cargo clippy --workspace --all-targets --locked -- -D warnings

# Unit, property and in-process end-to-end tests.
test:
    cargo test --workspace --locked

# Everything CI checks on the host.
ci: fmt-check clippy test

# The embedded simulated array, probed through the full SCSI stack.
probe-sim:
    cargo run --locked -q -p stp-tools -- probe --sim

# The real-LIO suite in the test VM, one boot (installs the VM's packages
# and fetches the guest kernel on first use; needs root for that).
vm-test *FILTER:
    scripts/vm-test -- {{FILTER}}

# One VM boot: raw vs fio (sg, io_uring O_DIRECT) on the same LIO LUNs,
# STP and TCP (docs/PERFORMANCE.md; needs root like vm-test).
# Ratio table; writes target/bench/lio.json.
bench-lio *ARGS:
    scripts/bench-lio {{ARGS}}

# Fuzz one target for SECONDS (cargo fuzz, nightly; docs/FUZZING.md).
# `just fuzz --list` names the targets, `just fuzz --smoke 10` runs each.
fuzz TARGET SECONDS="600":
    scripts/fuzz {{TARGET}} {{SECONDS}}
