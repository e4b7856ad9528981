//! The EVM side of epochs, driven with `alloy`: deploying ledgerlake's contracts
//! (`chain/contracts`, compiled into `chain/build` by solc-js), anchoring epoch roots in
//! `EpochAnchor`, and claiming from `RewardDistributor`. Glue: the rules are in
//! `ledgerlake-attribution` and the contracts.

use alloy::network::EthereumWallet;
use alloy::primitives::{Address as EvmAddress, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::Filter;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEvent;
use anyhow::{Context, Result, anyhow};
use ledgerlake_attribution::anchor::{Anchor, AnchorRequest, Anchored};
use ledgerlake_lakehouse::Lake;

alloy::sol!(
    #[sol(rpc)]
    OpenToken,
    "chain/build/OpenToken.json"
);
alloy::sol!(
    #[sol(rpc)]
    EpochAnchor,
    "chain/build/EpochAnchor.json"
);
alloy::sol!(
    #[sol(rpc)]
    RewardDistributor,
    "chain/build/RewardDistributor.json"
);
alloy::sol!(
    #[sol(rpc)]
    OpenStaking,
    "chain/build/OpenStaking.json"
);

/// A provider that signs with `key` (hex, with or without `0x`).
pub fn provider(rpc: &str, key: &str) -> Result<(DynProvider, EvmAddress)> {
    let signer: PrivateKeySigner = key.trim().trim_start_matches("0x").parse().context("the EVM key is not a hex private key")?;
    let from = signer.address();
    let url = rpc.parse().with_context(|| format!("{rpc:?} is not a URL"))?;
    let provider = ProviderBuilder::new().wallet(EthereumWallet::from(signer)).connect_http(url);
    Ok((provider.erased(), from))
}

/// Who holds which power in a deployment: three different accounts, so no one key (least
/// of all the server's online anchoring key) holds the supply, the anchoring and the right
/// to hand out anchoring.
#[derive(Clone, Copy, Debug)]
pub struct Roles {
    /// Receives the whole OPEN supply and funds the distributor.
    pub treasury: EvmAddress,
    /// Anchors epoch roots (the server's `evm_key`).
    pub anchorer: EvmAddress,
    /// Grants and revokes the anchoring role; default: the deployer.
    pub admin: Option<EvmAddress>,
}

impl Roles {
    /// The admin, and a refusal when two roles share an account or one is the zero address.
    fn check(&self, deployer: EvmAddress) -> Result<EvmAddress> {
        let admin = self.admin.unwrap_or(deployer);
        let named = [("treasury", self.treasury), ("anchorer", self.anchorer), ("admin", admin)];
        for (i, (a, x)) in named.iter().enumerate() {
            anyhow::ensure!(!x.is_zero(), "the {a} is the zero address");
            for (b, y) in &named[i + 1..] {
                anyhow::ensure!(x != y, "the {a} and the {b} are the same account {x}: each role needs its own key");
            }
        }
        Ok(admin)
    }
}

/// The four contracts of one deployment, and who holds which role.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Deployment {
    pub chain_id: u64,
    pub token: EvmAddress,
    pub anchor: EvmAddress,
    pub distributor: EvmAddress,
    pub staking: EvmAddress,
    /// Seconds between an unstake and its withdrawal.
    pub cooldown_s: u64,
    pub treasury: EvmAddress,
    pub anchorer: EvmAddress,
    pub admin: EvmAddress,
}

/// Deploys OPEN (its whole supply to the treasury), the anchor (anchoring by the anchorer,
/// its role administered by the admin), the distributor and the staking contract (with
/// `cooldown_s`), from `key` (the deployer).
pub async fn deploy(rpc: &str, key: &str, roles: Roles, cooldown_s: u64) -> Result<Deployment> {
    let (provider, from) = provider(rpc, key)?;
    let admin = roles.check(from)?;
    let chain_id = provider.get_chain_id().await.with_context(|| format!("asking {rpc} for its chain id"))?;
    let token = OpenToken::deploy(&provider, roles.treasury).await.context("deploying OpenToken")?;
    let anchor = EpochAnchor::deploy(&provider, admin, roles.anchorer).await.context("deploying EpochAnchor")?;
    let distributor =
        RewardDistributor::deploy(&provider, *token.address(), *anchor.address()).await.context("deploying RewardDistributor")?;
    let staking = OpenStaking::deploy(&provider, *token.address(), cooldown_s).await.context("deploying OpenStaking")?;
    Ok(Deployment {
        chain_id,
        token: *token.address(),
        anchor: *anchor.address(),
        distributor: *distributor.address(),
        staking: *staking.address(),
        cooldown_s,
        treasury: roles.treasury,
        anchorer: roles.anchorer,
        admin,
    })
}

/// What `chain fund` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Funded {
    pub transaction: B256,
    /// The distributor's OPEN balance after, in base units.
    pub distributor_balance: String,
}

/// Sends `amount` OPEN base units from `key` (the treasury) to the distributor.
pub async fn fund(rpc: &str, key: &str, distributor: EvmAddress, amount: U256) -> Result<Funded> {
    let (provider, from) = provider(rpc, key)?;
    let token = OpenToken::new(RewardDistributor::new(distributor, &provider).token().call().await.context("reading the distributor's token")?, &provider);
    let held = token.balanceOf(from).call().await.context("reading the treasury's balance")?;
    anyhow::ensure!(held >= amount, "{from} holds {held} OPEN base units, less than {amount}");
    let receipt = token.transfer(distributor, amount).send().await.context("sending the transfer")?.get_receipt().await?;
    anyhow::ensure!(receipt.status(), "the transfer {} reverted", receipt.transaction_hash);
    let balance = token.balanceOf(distributor).call().await?;
    Ok(Funded { transaction: receipt.transaction_hash, distributor_balance: balance.to_string() })
}

/// Anchors roots in an `EpochAnchor` contract. Idempotent and crash-safe: before sending,
/// it asks the contract; an epoch already anchored with the same root and manifest hash is
/// answered with the transaction that did it (found in the contract's `Anchored` logs), so
/// a close killed between sending and recording finishes without anchoring twice.
#[derive(Clone)]
pub struct EvmAnchor {
    pub rpc: String,
    /// The anchoring key (hex): never shown by `Debug`.
    pub key: String,
    pub contract: EvmAddress,
}

impl std::fmt::Debug for EvmAnchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvmAnchor").field("rpc", &self.rpc).field("key", &"redacted").field("contract", &self.contract).finish()
    }
}

impl EvmAnchor {
    async fn anchor_evm(&self, request: &AnchorRequest) -> Result<String> {
        let (provider, from) = provider(&self.rpc, &self.key)?;
        let chain_id = provider.get_chain_id().await.with_context(|| format!("asking {} for its chain id", self.rpc))?;
        let contract = EpochAnchor::new(self.contract, &provider);
        // A transaction of ours still pending (a close killed before it was mined): let it
        // land first, then ask the contract.
        let mut settled = false;
        for _ in 0..120 {
            let latest = provider.get_transaction_count(from).latest().await.context("reading the anchoring key's nonce")?;
            let pending = provider.get_transaction_count(from).pending().await.context("reading the anchoring key's pending nonce")?;
            if pending <= latest {
                settled = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        anyhow::ensure!(settled, "a transaction of the anchoring key {from} is still pending after a minute; close again later");
        let root = B256::from(request.root.to_bytes());
        let mut manifest = [0u8; 32];
        hex::decode_to_slice(request.manifest_sha256.as_str(), &mut manifest).context("manifest hash")?;
        let manifest = B256::from(manifest);
        let epoch = U256::from(request.epoch);
        let total = U256::from(request.total.base_units());
        let reference = |tx: B256| format!("evm:{chain_id}:{}:{tx}", self.contract);
        if let Some(tx) = self.anchored(&provider, epoch, root, manifest, total).await? {
            return Ok(reference(tx));
        }
        let role = contract.ANCHORER_ROLE().call().await.context("reading the anchor contract")?;
        anyhow::ensure!(
            contract.hasRole(role, from).call().await?,
            "the anchoring key {from} does not hold the anchor contract's ANCHORER_ROLE (`chain deploy --anchorer`, or a grant by its admin)"
        );
        let any = contract.anchoredAny().call().await.context("reading the anchor contract")?;
        let last = contract.lastEpoch().call().await?;
        if any && last >= epoch {
            let stored = contract.rootOf(epoch).call().await?;
            anyhow::bail!("the anchor contract is at epoch {last}; epoch {} holds root {stored}, not {root}", request.epoch);
        }
        let pending = contract.anchor(epoch, root, manifest, total).send().await.context("sending the anchor transaction")?;
        let receipt = pending.get_receipt().await.context("waiting for the anchor transaction")?;
        anyhow::ensure!(receipt.status(), "the anchor transaction {} reverted", receipt.transaction_hash);
        Ok(reference(receipt.transaction_hash))
    }

    /// The transaction that anchored `epoch` with exactly this root, manifest hash and total,
    /// if one did.
    async fn anchored(&self, provider: &DynProvider, epoch: U256, root: B256, manifest: B256, total: U256) -> Result<Option<B256>> {
        let filter = Filter::new()
            .address(self.contract)
            .event_signature(EpochAnchor::Anchored::SIGNATURE_HASH)
            .topic1(B256::from(epoch))
            .from_block(0);
        for log in provider.get_logs(&filter).await.context("reading the anchor contract's logs")? {
            let event = EpochAnchor::Anchored::decode_log(&log.inner).map_err(|e| anyhow!("an Anchored log does not decode: {e}"))?;
            if event.root == root && event.manifestHash == manifest && event.total == total {
                return Ok(log.transaction_hash);
            }
        }
        Ok(None)
    }

    /// What is wrong with an epoch's anchoring on chain (nothing: empty).
    pub async fn check(
        &self,
        epoch: u64,
        root: &ledgerlake_lakehouse::Bytes32,
        manifest: &ledgerlake_lakehouse::Sha256Hex,
        total: ledgerlake_lakehouse::Amount,
    ) -> Result<Vec<String>> {
        let (provider, _) = provider(&self.rpc, &self.key)?;
        let contract = EpochAnchor::new(self.contract, &provider);
        let stored_root = contract.rootOf(U256::from(epoch)).call().await.context("reading the anchor contract")?;
        let stored_manifest = contract.manifestOf(U256::from(epoch)).call().await?;
        let mut problems = Vec::new();
        if stored_root != B256::from(root.to_bytes()) {
            problems.push(format!("epoch {epoch}: the chain holds root {stored_root}, the epoch {root}"));
        }
        if hex::encode(stored_manifest) != manifest.as_str() {
            problems.push(format!("epoch {epoch}: the chain holds manifest {stored_manifest}, the epoch {manifest}"));
        }
        let stored_total = contract.totalOf(U256::from(epoch)).call().await?;
        if stored_total != U256::from(total.base_units()) {
            problems.push(format!("epoch {epoch}: the chain holds a total of {stored_total}, the epoch {total}"));
        }
        Ok(problems)
    }
}

impl Anchor for EvmAnchor {
    async fn anchor(&self, _lake: &Lake, request: &AnchorRequest, _now: chrono::DateTime<chrono::Utc>) -> Result<Anchored, ledgerlake_attribution::Error> {
        // Reaching the node is storage's fault (retry), not the caller's.
        let reference = self.anchor_evm(request).await.map_err(|e| ledgerlake_attribution::Error::Lake(format!("anchoring on chain: {e:#}")))?;
        Ok(Anchored { reference, events: vec![] })
    }
}

/// The result of one claim.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Claimed {
    pub transaction: B256,
    pub gas_used: u64,
    /// The account's OPEN balance after the claim, in base units.
    pub balance: String,
}

/// Sends `claim(epoch, account, amount, proof)` to the distributor from `key`'s address.
pub async fn claim(rpc: &str, key: &str, distributor: EvmAddress, epoch: u64, account: EvmAddress, amount: U256, proof: Vec<B256>) -> Result<Claimed> {
    let (provider, _) = provider(rpc, key)?;
    let contract = RewardDistributor::new(distributor, &provider);
    let call = contract.claim(U256::from(epoch), account, amount, proof);
    // A claim that would revert is refused by the node's estimate: say why.
    let pending = call.send().await.map_err(|e| anyhow!("the claim reverts: {}", revert_reason(&e)))?;
    let receipt = pending.get_receipt().await.context("waiting for the claim")?;
    anyhow::ensure!(receipt.status(), "the claim {} reverted", receipt.transaction_hash);
    let token = OpenToken::new(contract.token().call().await?, &provider);
    let balance = token.balanceOf(account).call().await?;
    Ok(Claimed { transaction: receipt.transaction_hash, gas_used: receipt.gas_used, balance: balance.to_string() })
}

/// What a staker asks of the staking contract.
#[derive(Clone, Debug)]
pub enum StakeCall {
    /// Approve and lock this many OPEN base units on the model.
    Stake(U256),
    /// Stop this many earning; withdrawable after the cooldown.
    Unstake(U256),
    /// Take back what the cooldown released.
    Withdraw,
}

/// The result of a staking call.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Staked {
    pub transaction: B256,
    /// The account's stake on the model after it (earning), in base units.
    pub staked: String,
    /// Unstaked and not yet withdrawn, in base units, and when it may be (unix seconds).
    pub pending: String,
    pub ready_at: u64,
}

/// Sends `call` for `model` to the staking contract from `key`'s account.
pub async fn stake(rpc: &str, key: &str, staking: EvmAddress, model: &str, call: StakeCall) -> Result<Staked> {
    let (provider, from) = provider(rpc, key)?;
    let contract = OpenStaking::new(staking, &provider);
    let reason = |e: alloy::contract::Error| {
        use OpenStaking::OpenStakingErrors as E;
        match e.as_decoded_interface_error::<E>() {
            Some(E::InsufficientStake(x)) => anyhow!("InsufficientStake: {} staked, {} asked", x.staked, x.amount),
            Some(E::CooldownNotOver(x)) => anyhow!("CooldownNotOver: withdrawable from {} (unix seconds)", x.readyAt),
            Some(E::NothingToWithdraw(_)) => anyhow!("NothingToWithdraw"),
            Some(E::ZeroAmount(_)) => anyhow!("ZeroAmount"),
            Some(E::EmptyModelId(_)) => anyhow!("EmptyModelId"),
            _ => anyhow!("the staking call reverts: {e}"),
        }
    };
    let pending = match call {
        StakeCall::Stake(amount) => {
            let token = OpenToken::new(contract.token().call().await.context("reading the staking contract's token")?, &provider);
            let held = token.balanceOf(from).call().await?;
            anyhow::ensure!(held >= amount, "{from} holds {held} OPEN base units, less than {amount}");
            let approved = token.approve(staking, amount).send().await.context("approving the stake")?.get_receipt().await?;
            anyhow::ensure!(approved.status(), "the approval {} reverted", approved.transaction_hash);
            contract.stake(model.to_owned(), amount).send().await.map_err(reason)?
        }
        StakeCall::Unstake(amount) => contract.unstake(model.to_owned(), amount).send().await.map_err(reason)?,
        StakeCall::Withdraw => contract.withdraw(model.to_owned()).send().await.map_err(reason)?,
    };
    let receipt = pending.get_receipt().await.context("waiting for the staking call")?;
    anyhow::ensure!(receipt.status(), "the staking call {} reverted", receipt.transaction_hash);
    let staked = contract.stakeOf(from, model.to_owned()).call().await?;
    let p = contract.pendingOf(from, model.to_owned()).call().await?;
    Ok(Staked { transaction: receipt.transaction_hash, staked: staked.to_string(), pending: p.amount.to_string(), ready_at: p.readyAt })
}

/// Follows an `OpenStaking` contract into `stake_changed`: each `Staked` and `Unstaked`
/// log at least `confirmations` blocks under the head becomes a `stake.changed` dated at
/// its block's time, with the id `ledgerlake:stake:<chain>:<tx>:<log index>` (so a
/// replay stores nothing twice). Where it got to is kept in `cursor` (a JSON file); a
/// process killed before saving it reads the same logs again, and they are duplicates.
#[derive(Clone, Debug)]
pub struct StakeFollower {
    pub rpc: String,
    pub contract: EvmAddress,
    pub confirmations: u64,
    /// The chain id the deployment's signatures name, if configured: the node must be it.
    pub chain_id: Option<u64>,
    pub cursor: std::path::PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
struct Cursor {
    chain_id: u64,
    contract: EvmAddress,
    next_block: u64,
}

/// Blocks read in one `eth_getLogs`.
const LOG_RANGE: u64 = 5_000;

impl StakeFollower {
    /// Follows until the confirmed head; returns how many stake events were stored.
    pub async fn poll(&self, ingestor: &ledgerlake_ingest::Ingestor) -> Result<usize> {
        use ledgerlake_lakehouse::events::{Event, RESERVED_ID_PREFIX, StakeAction, StakeChanged};
        let url = self.rpc.parse().with_context(|| format!("{:?} is not a URL", self.rpc))?;
        let provider = ProviderBuilder::new().connect_http(url);
        let chain_id = provider.get_chain_id().await.with_context(|| format!("asking {} for its chain id", self.rpc))?;
        if let Some(expected) = self.chain_id {
            anyhow::ensure!(chain_id == expected, "{} is chain {chain_id}, not the configured chain_id {expected}", self.rpc);
        }
        let fresh = Cursor { chain_id, contract: self.contract, next_block: 0 };
        let mut cursor = match std::fs::read(&self.cursor) {
            Ok(bytes) => match serde_json::from_slice::<Cursor>(&bytes) {
                Ok(c) if c.chain_id == chain_id && c.contract == self.contract => c,
                _ => fresh,
            },
            Err(_) => fresh,
        };
        let head = provider.get_block_number().await.context("reading the chain's head")?;
        let Some(safe) = head.checked_sub(self.confirmations) else { return Ok(0) };
        let mut stored = 0;
        while cursor.next_block <= safe {
            let to = safe.min(cursor.next_block.saturating_add(LOG_RANGE - 1));
            let filter = Filter::new().address(self.contract).from_block(cursor.next_block).to_block(to);
            let logs = provider.get_logs(&filter).await.context("reading the staking contract's logs")?;
            let mut times: std::collections::HashMap<u64, chrono::DateTime<chrono::Utc>> = Default::default();
            let mut events = Vec::new();
            for log in logs {
                let (Some(block), Some(tx), Some(index)) = (log.block_number, log.transaction_hash, log.log_index) else { continue };
                let (staker, model, action, amount) = match log.topic0() {
                    Some(t) if *t == OpenStaking::Staked::SIGNATURE_HASH => {
                        let e = OpenStaking::Staked::decode_log(&log.inner).map_err(|e| anyhow!("a Staked log does not decode: {e}"))?;
                        (e.staker, e.modelId.clone(), StakeAction::Stake, e.amount)
                    }
                    Some(t) if *t == OpenStaking::Unstaked::SIGNATURE_HASH => {
                        let e = OpenStaking::Unstaked::decode_log(&log.inner).map_err(|e| anyhow!("an Unstaked log does not decode: {e}"))?;
                        (e.staker, e.modelId.clone(), StakeAction::Unstake, e.amount)
                    }
                    _ => continue,
                };
                // The contract takes any string and any amount; the lake only model ids
                // and amounts. Such a stake earns nothing here (its OPEN can be unstaked).
                let Ok(model_id) = model.parse() else {
                    tracing::warn!(%tx, model, "a stake on a string that is not a model id: not followed");
                    continue;
                };
                let Some(amount) = u128::try_from(amount).ok().and_then(|a| ledgerlake_lakehouse::Amount::new(a).ok()) else {
                    tracing::warn!(%tx, %amount, "a stake larger than an amount: not followed");
                    continue;
                };
                let event_time = match times.get(&block) {
                    Some(t) => *t,
                    None => {
                        let b = provider.get_block_by_number(block.into()).await?.with_context(|| format!("block {block} is gone"))?;
                        let t = chrono::DateTime::from_timestamp(b.header.timestamp as i64, 0).context("a block time out of range")?;
                        times.insert(block, t);
                        t
                    }
                };
                let event_id = format!("{RESERVED_ID_PREFIX}stake:{chain_id}:{tx}:{index}").parse().context("a stake's event id")?;
                events.push((events.len(), Event::StakeChanged(StakeChanged { event_id, event_time, staker: staker.into(), model_id, action, amount })));
            }
            if !events.is_empty() {
                let receipt = ingestor.submit(events, true).await.map_err(|e| anyhow!("storing followed stakes: {e}"))?;
                if let Some(e) = receipt.errors.first() {
                    anyhow::bail!("a followed stake was refused ({}: {}); the follower stays at block {}", e.field, e.message, cursor.next_block);
                }
                stored += receipt.accepted;
            }
            cursor.next_block = to + 1;
            let bytes = serde_json::to_vec(&cursor)?;
            let tmp = self.cursor.with_extension("tmp");
            std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &self.cursor)).with_context(|| format!("saving {}", self.cursor.display()))?;
        }
        Ok(stored)
    }

    /// Polls every `interval` until the process ends; a failed poll is logged and retried.
    pub async fn run(self, ingestor: ledgerlake_ingest::Ingestor, interval: std::time::Duration) {
        loop {
            match self.poll(&ingestor).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(stored = n, "followed stakes from the staking contract"),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "following the staking contract"),
            }
            tokio::time::sleep(interval).await;
        }
    }
}

/// The distributor's custom error behind a failed call, by name, if it is one.
fn revert_reason(e: &alloy::contract::Error) -> String {
    use RewardDistributor::RewardDistributorErrors as E;
    match e.as_decoded_interface_error::<E>() {
        Some(E::AlreadyClaimed(_)) => "AlreadyClaimed".into(),
        Some(E::InvalidProof(_)) => "InvalidProof".into(),
        Some(E::NotAnchored(_)) => "NotAnchored".into(),
        Some(E::EpochCapExceeded(c)) => format!("EpochCapExceeded: epoch {} pays at most {}, this claim would bring it to {}", c.epoch, c.total, c.wouldPay),
        _ => e.to_string(),
    }
}
