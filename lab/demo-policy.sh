#!/usr/bin/env bash
# The signing chain, end to end, with the real binaries: two ops keys, a
# policy validated and signed with a 2-of-2 threshold, verified the way a
# device verifies it, and refused once tampered with, rolled into the wrong
# device class, or signed by too few keys. (The network-namespace site of
# `make demo` grows on top of this as the agent's enforcement lands.)
set -euo pipefail
bin=$(cd "${1:-bin}" && pwd)
examples=$(cd "$(dirname "$0")/../examples" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
expect_refusal() { # run a command that must fail, and show why it did
	if out=$("$@" 2>&1); then
		echo "DEMO FAILED: this was accepted: $*" >&2
		exit 1
	fi
	echo "refused as expected: $out"
}

step "security operations create two signing keys (kept offline, 2-of-2)"
"$bin/bulkhead-control" keygen --out alice
"$bin/bulkhead-control" keygen --out bob

step "the site policy is validated (segments, partner tiers, shifts, profiles)"
"$bin/bulkhead-control" policy validate "$examples/logistics-site.json"

step "a policy with a contradiction is refused before anything is signed"
sed 's/"restricted": \["wms"\],/"restricted": ["wms", "finance"],/' "$examples/logistics-site.json" >scanner-finance.json
expect_refusal "$bin/bulkhead-control" policy validate scanner-finance.json

step "both keys sign version 7 for the scanners, valid 30 days"
"$bin/bulkhead-control" policy sign --key alice/ops.key --key bob/ops.key \
	--in "$examples/logistics-site.json" --version 7 --target scanner --valid-for 720h --out scanner-v7.dsse

step "a scanner verifies it against its pinned keys"
"$bin/bulkhead" policy verify --trust alice/ops.pub --trust bob/ops.pub --class scanner scanner-v7.dsse

step "one byte changed in transit: refused"
cp scanner-v7.dsse tampered.dsse
at=$(( $(grep -bo '"payload":"' tampered.dsse | head -1 | cut -d: -f1) + 200 ))
byte=$(dd if=tampered.dsse bs=1 skip="$at" count=1 2>/dev/null)
[ "$byte" = A ] && swap=B || swap=A
printf '%s' "$swap" | dd of=tampered.dsse bs=1 seek="$at" conv=notrunc 2>/dev/null
expect_refusal "$bin/bulkhead" policy verify --trust alice/ops.pub --trust bob/ops.pub tampered.dsse

step "the same bundle offered to a telematics box: refused"
expect_refusal "$bin/bulkhead" policy verify --trust alice/ops.pub --trust bob/ops.pub --class telematics scanner-v7.dsse

step "signed by one key where two are required: refused"
"$bin/bulkhead-control" policy sign --key alice/ops.key \
	--in "$examples/logistics-site.json" --version 8 --target scanner --valid-for 720h --out one-key.dsse
expect_refusal "$bin/bulkhead" policy verify --trust alice/ops.pub --trust bob/ops.pub one-key.dsse

printf '\ndemo complete\n'
