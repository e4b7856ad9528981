"""An independent re-implementation of a reward epoch, written from docs/epochs.md alone:
it reads the lake's tables at the versions an epoch recorded (deltalake + polars), splits
the fees by the documented rules with Python's integers, builds the Merkle tree with the
npm package @openzeppelin/merkle-tree and the manifest, and returns what it found.

    python recompute_epoch.py <lake> <epoch>      # prints root, manifest sha256 and rewards
"""
import datetime
import hashlib
import json
import os
import subprocess
import sys

import polars as pl
from deltalake import DeltaTable

CHAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "chain")
SCALE = 10**9  # attribution weights: parts per billion
ROLES = ("builder", "contributor", "staker", "treasury")


def table(lake, name, version, columns):
    """The table at `version`; a table never written is empty (version 0)."""
    path = os.path.join(lake, name)
    if not os.path.exists(os.path.join(path, "_delta_log")):
        return pl.DataFrame({c: [] for c in columns})
    return pl.from_arrow(DeltaTable(path, version=version).to_pyarrow_table(columns=columns))


def micros(df, column):
    return df[column].cast(pl.Datetime("us", "UTC")).dt.epoch("us").to_list()


def apportion(amount, weights):
    """The documented rule: floors, then one unit each to the largest remainders, ties to the
    earlier weight."""
    total = sum(weights)
    if total == 0:
        return [0] * len(weights)
    shares = [amount * w // total for w in weights]
    rems = sorted(range(len(weights)), key=lambda i: (-(amount * weights[i] % total), i))
    for i in rems[: amount - sum(shares)]:
        shares[i] += 1
    return shares


def lower(address):
    return address.lower()


def recompute(lake, epoch):
    epochs = pl.from_arrow(DeltaTable(os.path.join(lake, "epochs")).to_pyarrow_table())
    row = epochs.filter((pl.col("epoch") == epoch) & (pl.col("stage") == "closed")).to_dicts()[0]
    start = micros(epochs.filter(pl.col("event_id") == row["event_id"]), "window_start")[0]
    end = micros(epochs.filter(pl.col("event_id") == row["event_id"]), "window_end")[0]

    # Events an admin voided at the pinned version of voided_events do not count.
    void_version = row.get("void_version")
    voided = []
    if void_version is not None:
        voided = table(lake, "voided_events", void_version, ["voided_event_id"])["voided_event_id"].to_list()

    # The epoch's fees: before its end, minus the previous epoch's and earlier ones; none
    # at all when an admin closed it empty.
    fees = table(lake, "fee_charged", row["fee_version"], ["event_id", "event_time", "inference_id", "model_id", "amount"])
    fees = fees.with_columns(pl.Series("t", micros(fees, "event_time"), dtype=pl.Int64)).filter(pl.col("t") < end)
    fees = fees.filter(~pl.col("event_id").is_in(voided))
    if row.get("empty_reason") is not None:
        fees = fees.head(0)
    if row["previous_fee_version"] is not None:
        prev = table(lake, "fee_charged", row["previous_fee_version"], ["event_id", "event_time"])
        prev = prev.with_columns(pl.Series("t", micros(prev, "event_time"), dtype=pl.Int64)).filter(pl.col("t") < start)
        fees = fees.filter(~pl.col("event_id").is_in(prev["event_id"].to_list()))

    attr = table(lake, "attributions", row["attribution_version"], ["event_id", "inference_id", "contributor", "datanet_id", "weight"])
    attr = attr.filter(pl.col("contributor").is_not_null() & (pl.col("weight") > 0) & ~pl.col("event_id").is_in(voided))
    weights_of = {}
    for a in attr.to_dicts():
        weights_of.setdefault(a["inference_id"], []).append(a)

    # A model id belongs to the builder of its first registration in ingest order; that
    # builder's latest registration counts.
    regs = table(lake, "model_registered", row["registration_version"], ["model_id", "builder", "event_time", "ingested_at", "event_id"])
    regs = regs.filter(~pl.col("event_id").is_in(voided))
    owner, builder = {}, {}
    for r in sorted(regs.to_dicts(), key=lambda r: (r["ingested_at"], r["event_time"], r["event_id"])):
        owner.setdefault(r["model_id"], lower(r["builder"]))
        if lower(r["builder"]) == owner[r["model_id"]]:
            builder[r["model_id"]] = lower(r["builder"])

    stakes = table(lake, "stake_changed", row["stake_version"], ["model_id", "staker", "action", "amount", "event_time", "event_id"])
    stakes = stakes.with_columns(pl.Series("t", micros(stakes, "event_time"), dtype=pl.Int64)).filter(pl.col("t") < end)
    stakes = stakes.filter(~pl.col("event_id").is_in(voided))

    policy = {k: row[k] for k in ("treasury_bps", "builder_bps", "stakers_bps", "contributors_bps")}
    treasury = lower(row["treasury"])
    owed = {}  # (account, role) -> sub-units

    def add(account, role, sub):
        if sub:
            owed[(account, role)] = owed.get((account, role), 0) + sub

    by_model = {}
    for f in fees.to_dicts():
        a = int(f["amount"])
        by_model[f["model_id"]] = by_model.get(f["model_id"], 0) + a
        part = a * policy["contributors_bps"] * SCALE
        pairs = {}
        for r in weights_of.get(f["inference_id"], []):
            key = (lower(r["contributor"]), r["datanet_id"])
            pairs[key] = pairs.get(key, 0) + int(r["weight"])
        if not pairs:
            add(treasury, "treasury", part)
            continue
        keys = sorted(pairs)
        for key, share in zip(keys, apportion(part, [pairs[k] for k in keys])):
            add(key[0], "contributor", share)

    for model, total in by_model.items():
        add(treasury, "treasury", total * policy["treasury_bps"] * SCALE)
        add(builder.get(model, treasury), "builder" if model in builder else "treasury", total * policy["builder_bps"] * SCALE)
        pool = total * policy["stakers_bps"] * SCALE
        balance, since, stake_time = {}, {}, {}
        for s in sorted(stakes.filter(pl.col("model_id") == model).to_dicts(), key=lambda s: (s["t"], s["event_id"])):
            who = lower(s["staker"])
            b = balance.get(who, 0)
            stake_time[who] = stake_time.get(who, 0) + b * max(0, min(s["t"], end) - max(since.get(who, s["t"]), start))
            amount = int(s["amount"])
            balance[who] = b + amount if s["action"] == "stake" else max(0, b - amount)
            since[who] = s["t"]
        for who, b in balance.items():
            stake_time[who] += b * max(0, end - max(since[who], start))
        stakers = sorted(w for w, t in stake_time.items() if t > 0)
        if not stakers:
            add(treasury, "treasury", pool)
        for who, share in zip(stakers, apportion(pool, [stake_time[w] for w in stakers])):
            add(who, "staker", share)

    total = sum(int(f["amount"]) for f in fees.to_dicts())
    keys = sorted(owed)
    rewards = [(k[0], k[1], amt) for k, amt in zip(keys, apportion(total, [owed[k] for k in keys])) if amt > 0]
    assert sum(r[2] for r in rewards) == total

    per_account = {}
    for account, _, amount in rewards:
        per_account[account] = per_account.get(account, 0) + amount
    values = [[a, str(per_account[a])] for a in sorted(per_account)]
    if values:
        out = subprocess.run(["node", os.path.join(CHAIN, "merkle.js"), "of"], input=json.dumps({"values": values}),
                             capture_output=True, text=True, check=True)
        tree = json.loads(out.stdout)
        root = tree["root"]
    else:
        tree, root = None, "0x" + "00" * 32

    listing = "".join(sorted(f"{a},{role},{amount}\n" for a, role, amount in rewards))
    totals = {role: str(sum(r[2] for r in rewards if r[1] == role)) for role in ROLES}
    def fmt(us):
        seconds, rest = divmod(us, 10**6)
        return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{rest:06d}Z"

    inputs = {"attributions": row["attribution_version"], "fee_charged": row["fee_version"],
              "fee_charged_previous": row["previous_fee_version"], "model_registered": row["registration_version"],
              "stake_changed": row["stake_version"]}
    if void_version is not None:
        inputs["voided_events"] = void_version
    manifest = {
        "epoch": epoch,
        "format": "ledgerlake-epoch-v1",
        "inputs": inputs,
        "merkle_root": root,
        "policy": {**policy, "treasury": treasury},
        "rewards_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "totals": {"accounts": len(values), "fee_count": fees.height, "fees": str(total), **totals},
        "window": {"end": fmt(end), "start": fmt(start)},
    }
    if row.get("empty_reason") is not None:
        manifest["empty_reason"] = row["empty_reason"]
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return {"root": root, "manifest": manifest_bytes, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "rewards": rewards, "values": values, "tree": tree, "recorded": row}


if __name__ == "__main__":
    got = recompute(sys.argv[1], int(sys.argv[2]))
    print(json.dumps({"root": got["root"], "manifest_sha256": got["manifest_sha256"], "rewards": got["rewards"]}, indent=1))
