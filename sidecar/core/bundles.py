"""Evidence bundles, checked offline with nothing but the gateway's key set. Pure.

A bundle (`sidecar/ledger/evidence.py` exports one) is one JSON document:

    {"format": "fth-x402/2.0 evidence",
     "statement": {signed: what was exported, the receipt and batch ids it contains},
     "batches": [signed batch manifests],
     "receipts": [{"receipt": {signed receipt}, "batch_id", "proof": {"index", "size",
                   "path": [hex]}}]}

Every signature is by a key of the gateway's key set, the one its `kid` names: receipts
(`fth-x402/2.0 receipt\\n`) and manifests (`fth-x402/2.0 batch\\n`) by the key that
signed the receipts (a previous key's, for what was paid before a rotation), the export
statement (`fth-x402/2.0 evidence\\n`) by the current key, so a
receipt cannot be altered, added or dropped, nor a manifest forged, without
`verify_bundle` saying which and how.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.core import merkle, vouchers
from sidecar.core.batches import leaf, verify_manifest
from sidecar.core.errors import AmountError
from sidecar.core.identity import Identity, public_key_set, verify, verify_key
from sidecar.core.money import to_atomic
from sidecar.core.protocol import VERSION, canonical_json, verify_receipt

FORMAT = "fth-x402/2.0 evidence"
STATEMENT_DOMAIN = b"fth-x402/2.0 evidence\n"


def entries(
    batch_id: str,
    receipts: Sequence[Mapping[str, Any]],
    tree: merkle.MerkleTree,
    chosen: Callable[[Mapping[str, Any]], bool],
) -> list[dict[str, Any]]:
    """The chosen receipts of one batch (its leaves, in order), each with its proof."""
    return [
        {
            "receipt": receipt,
            "batch_id": batch_id,
            "proof": {
                "index": index,
                "size": tree.size,
                "path": [node.hex() for node in tree.proof(index)],
            },
        }
        for index, receipt in enumerate(receipts)
        if chosen(receipt)
    ]


def bundle(
    manifests: list[dict[str, Any]],
    items: list[dict[str, Any]],
    query: Mapping[str, Any],
    created_at: int,
    gateway: Identity,
    anchor_contract: str | None = None,
) -> dict[str, Any]:
    """The bundle of these manifests and receipt entries, with the signed statement that
    lists them (so none can be dropped or added unnoticed) and, where batches are anchored
    on chain, the anchor contract's address (what `evidence verify --chain` reads)."""
    statement: dict[str, Any] = {
        "version": VERSION,
        "type": "evidence-export",
        "query": dict(query),
        "created_at": created_at,
        "receipts": [item["receipt"]["receipt_id"] for item in items],
        "batches": [m["batch_id"] for m in manifests],
        "kid": gateway.kid,
    }
    if anchor_contract:
        statement["anchor_contract"] = anchor_contract
    signed = {**statement, "signature": gateway.sign(STATEMENT_DOMAIN + canonical_json(statement))}
    return {"format": FORMAT, "statement": signed, "batches": manifests, "receipts": items}


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    receipts: int = 0
    batches: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def parse_public_key(text: str) -> str:
    """A gateway public key (base64url of 32 bytes); ValueError if it is not one."""
    [key] = public_key_set([text]).values()
    return key


def verify_bundle(bundle: Any, public_keys: Mapping[str, str] | str) -> Verdict:
    """Check everything offline with the gateway's key set ({kid: base64url public key}:
    `identity.public_key_set`, or `published_key_set` of its discovery document; after a
    rotation it holds the previous keys too), or its one public key. Every problem found
    is one line that names what fails."""
    if isinstance(public_keys, str):
        public_keys = public_key_set([public_keys])
    verdict = Verdict()
    problems = verdict.problems
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        problems.append(f"not an evidence bundle (format is not {FORMAT!r})")
        return verdict
    known = ", ".join(sorted(public_keys))

    statement = bundle.get("statement")
    listed_receipts: list[str] = []
    listed_batches: list[str] = []
    statement_ok = isinstance(statement, dict) and _signed_by(
        statement, STATEMENT_DOMAIN, public_keys
    )
    if not isinstance(statement, dict) or not statement_ok:
        problems.append(
            f"export statement: signature does not verify with the key set ({known}) "
            "(the list of exported receipts was altered, or another key signed it)"
        )
    else:
        listed_receipts = [str(r) for r in statement.get("receipts") or []]
        listed_batches = [str(b) for b in statement.get("batches") or []]

    manifests = _check_manifests(_list(bundle, "batches"), public_keys, verdict)

    seen: set[str] = set()
    for item in _list(bundle, "receipts"):
        verdict.receipts += 1
        receipt = item.get("receipt")
        if not isinstance(receipt, dict):
            problems.append("a receipt entry has no receipt object")
            continue
        rid = str(receipt.get("receipt_id"))
        if rid in seen:
            problems.append(f"receipt {rid}: appears twice")
        seen.add(rid)
        if receipt.get("kid") not in public_keys:
            problems.append(
                f"receipt {rid}: signed by {receipt.get('kid')!r}, not a key of the set ({known})"
            )
        elif not verify_receipt(receipt, public_keys):
            problems.append(f"receipt {rid}: gateway signature does not verify (altered)")
        problems.extend(f"receipt {rid}: {p}" for p in _check_voucher(receipt))
        batch = str(item.get("batch_id"))
        anchored = manifests.get(batch)
        if anchored is None:
            problems.append(f"receipt {rid}: its batch {batch} is not in the bundle")
            continue
        if receipt.get("payer") != anchored.get("payer"):
            problems.append(f"receipt {rid}: payer differs from batch {batch}'s payer")
        if not _proof_holds(receipt, item.get("proof"), anchored):
            problems.append(
                f"receipt {rid}: Merkle proof does not lead to batch {batch}'s root "
                "(the receipt or its proof was altered, or the batch was forged)"
            )

    for rid in listed_receipts:
        if rid not in seen:
            problems.append(
                f"receipt {rid}: listed in the signed export statement but missing (dropped)"
            )
    if statement_ok:
        for rid in sorted(seen - set(listed_receipts)):
            problems.append(f"receipt {rid}: not in the signed export statement (added)")
    for batch in listed_batches:
        if batch not in manifests:
            problems.append(f"batch {batch}: listed in the signed export statement but missing")
    return verdict


def _check_manifests(
    found: list[dict[str, Any]], public_keys: Mapping[str, str], verdict: Verdict
) -> dict[str, Mapping[str, Any]]:
    """Each manifest signed by the key of the set its `kid` names; by batch id."""
    manifests: dict[str, Mapping[str, Any]] = {}
    for manifest in found:
        batch = str(manifest.get("batch_id"))
        verdict.batches += 1
        if batch in manifests:
            verdict.problems.append(f"batch {batch}: appears twice")
        manifests[batch] = manifest
        kid = manifest.get("kid")
        if not isinstance(kid, str) or kid not in public_keys:
            known = ", ".join(sorted(public_keys))
            verdict.problems.append(
                f"batch {batch}: signed by {kid!r}, not a key of the set ({known})"
            )
        elif not verify_manifest(manifest, public_keys[kid]):
            verdict.problems.append(
                f"batch {batch}: manifest signature does not verify (forged or altered)"
            )
    return manifests


def _list(bundle: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    value = bundle.get(name)
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _signed_by(obj: Mapping[str, Any], domain: bytes, public_keys: Mapping[str, str]) -> bool:
    """Signed by the key of the set that its `kid` names."""
    signature, kid = obj.get("signature"), obj.get("kid")
    if not isinstance(signature, str) or not isinstance(kid, str) or kid not in public_keys:
        return False
    try:
        key = verify_key(public_keys[kid])
    except ValueError:
        return False
    body = {k: v for k, v in obj.items() if k != "signature"}
    return verify(key, domain + canonical_json(body), signature)


def _proof_holds(receipt: Mapping[str, Any], proof: Any, manifest: Mapping[str, Any]) -> bool:
    if not isinstance(proof, dict) or proof.get("size") != manifest.get("count"):
        return False
    try:
        root = bytes.fromhex(str(manifest.get("merkle_root")))
    except (TypeError, ValueError):
        return False
    return _leads_to(receipt, proof, root)


def _leads_to(receipt: Mapping[str, Any], proof: Any, root: bytes) -> bool:
    """Whether the receipt's inclusion proof leads to `root`."""
    if not isinstance(proof, dict):
        return False
    index, size, path = proof.get("index"), proof.get("size"), proof.get("path")
    if type(index) is not int or type(size) is not int or not isinstance(path, list):
        return False
    try:
        nodes = [bytes.fromhex(node) for node in path]
    except (TypeError, ValueError):
        return False
    return merkle.verify(leaf(receipt), index, size, nodes, root)


# -- against the chain: the roots its anchor contract holds (ledger/anchors.py) ----------


@dataclass(frozen=True)
class AnchorProblem:
    """One way a bundle fails against the chain; `reason` is for programs: not_anchored
    (the batch has no root on chain), root_mismatch (the manifest's root is not the one on
    chain), proof_mismatch (the receipt's proof does not lead to the root on chain)."""

    reason: str
    message: str


def anchor_contract(bundle: Any) -> str | None:
    """The anchor contract the bundle's statement names (check the statement's signature
    before trusting it: verify_bundle)."""
    statement = bundle.get("statement") if isinstance(bundle, dict) else None
    named = statement.get("anchor_contract") if isinstance(statement, dict) else None
    return named if isinstance(named, str) else None


def anchored_batches(bundle: Any) -> list[str]:
    """Every batch id a bundle names (its manifests' and its receipts'), once, in order."""
    if not isinstance(bundle, dict):
        return []
    named = [str(m.get("batch_id")) for m in _list(bundle, "batches")]
    named += [str(i.get("batch_id")) for i in _list(bundle, "receipts")]
    return list(dict.fromkeys(named))


def check_anchors(bundle: Any, roots: Mapping[str, bytes | None]) -> list[AnchorProblem]:
    """Each receipt's inclusion proof against the root the chain holds for its batch
    (`roots`: batch id → root, None when not anchored), and each manifest's root against
    the chain's. Pure: the caller reads the roots."""
    if not isinstance(bundle, dict):
        return [AnchorProblem("not_anchored", "not an evidence bundle")]
    problems = []
    for manifest in _list(bundle, "batches"):
        batch, on_chain = str(manifest.get("batch_id")), roots.get(str(manifest.get("batch_id")))
        if on_chain is not None and manifest.get("merkle_root") != on_chain.hex():
            problems.append(
                AnchorProblem(
                    "root_mismatch",
                    f"batch {batch}: the manifest's root {manifest.get('merkle_root')} is not "
                    f"the root on chain {on_chain.hex()}",
                )
            )
    for item in _list(bundle, "receipts"):
        receipt, batch = item.get("receipt"), str(item.get("batch_id"))
        rid = receipt.get("receipt_id") if isinstance(receipt, dict) else None
        on_chain = roots.get(batch)
        if on_chain is None:
            problems.append(
                AnchorProblem(
                    "not_anchored", f"receipt {rid}: its batch {batch} is not anchored on chain"
                )
            )
        elif not isinstance(receipt, dict) or not _leads_to(receipt, item.get("proof"), on_chain):
            problems.append(
                AnchorProblem(
                    "proof_mismatch",
                    f"receipt {rid}: Merkle proof does not lead to the root on chain for batch "
                    f"{batch} (the receipt or its proof was altered)",
                )
            )
    return problems


def _check_voucher(receipt: Mapping[str, Any]) -> Sequence[str]:
    """A channel close carries the payer's final voucher: it must be the payer's, for this
    channel, and for exactly the amount settled."""
    if receipt.get("scheme") != vouchers.SCHEME:
        return []
    voucher = receipt.get("voucher")
    if voucher is None:
        return [] if receipt.get("amount") == "0" else ["a channel close without a voucher"]
    if not isinstance(voucher, dict) or not vouchers.verify_signature(voucher):
        return ["the payer's final voucher signature does not verify"]
    problems = []
    if voucher.get("payer") != receipt.get("payer"):
        problems.append("the final voucher is not the payer's")
    if voucher.get("channel_id") != receipt.get("channel_id"):
        problems.append("the final voucher is for another channel")
    try:
        same = to_atomic(str(voucher.get("cumulative")), 18) == to_atomic(
            str(receipt.get("amount")), 18
        )
    except AmountError:
        same = False
    if not same:
        problems.append("the settled amount is not the final voucher's cumulative amount")
    return problems
