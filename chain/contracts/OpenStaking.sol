// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";

/// @title Stakes of OPEN on ledgerlake's models.
/// @notice A staker locks OPEN on a model id (`stake`); the stake earns the model's staker
/// share of each reward epoch from the block it lands in. `unstake` stops the earning at
/// once and starts a cooldown; after it, `withdraw` returns the OPEN. ledgerlake follows
/// the `Staked` and `Unstaked` events (with confirmations) into its `stake_changed` table,
/// so no key of the server can stake for free or unstake for someone else.
contract OpenStaking {
    using SafeERC20 for IERC20;

    IERC20 public immutable token;
    /// @notice Seconds between an unstake and the withdrawal of its OPEN.
    uint64 public immutable cooldown;

    struct Pending {
        uint256 amount;
        uint64 readyAt;
    }

    mapping(address staker => mapping(bytes32 model => uint256)) private _staked;
    mapping(address staker => mapping(bytes32 model => Pending)) private _pending;

    event Staked(address indexed staker, string modelId, uint256 amount);
    event Unstaked(address indexed staker, string modelId, uint256 amount, uint64 readyAt);
    event Withdrawn(address indexed staker, string modelId, uint256 amount);

    error ZeroAmount();
    error EmptyModelId();
    error InsufficientStake(uint256 staked, uint256 amount);
    error CooldownNotOver(uint64 readyAt);
    error NothingToWithdraw();
    error CooldownTooLong(uint64 cooldown);

    /// @notice The longest cooldown a deployment may choose (a year): no unstake can ever
    /// overflow its release time.
    uint64 public constant MAX_COOLDOWN = 365 days;

    constructor(IERC20 token_, uint64 cooldown_) {
        if (cooldown_ > MAX_COOLDOWN) revert CooldownTooLong(cooldown_);
        token = token_;
        cooldown = cooldown_;
    }

    /// @notice Locks `amount` OPEN (approved to this contract first) on `modelId`.
    function stake(string calldata modelId, uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        if (bytes(modelId).length == 0) revert EmptyModelId();
        token.safeTransferFrom(msg.sender, address(this), amount);
        _staked[msg.sender][keccak256(bytes(modelId))] += amount;
        emit Staked(msg.sender, modelId, amount);
    }

    /// @notice Stops `amount` of the caller's stake on `modelId` earning, now; its OPEN can
    /// be withdrawn `cooldown` seconds later (a later unstake on the same model restarts
    /// the wait for all of it).
    function unstake(string calldata modelId, uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        bytes32 model = keccak256(bytes(modelId));
        uint256 staked = _staked[msg.sender][model];
        if (staked < amount) revert InsufficientStake(staked, amount);
        _staked[msg.sender][model] = staked - amount;
        Pending storage p = _pending[msg.sender][model];
        p.amount += amount;
        p.readyAt = uint64(block.timestamp) + cooldown;
        emit Unstaked(msg.sender, modelId, amount, p.readyAt);
    }

    /// @notice Returns the caller's unstaked OPEN on `modelId` once its cooldown is over.
    function withdraw(string calldata modelId) external {
        Pending storage p = _pending[msg.sender][keccak256(bytes(modelId))];
        uint256 amount = p.amount;
        if (amount == 0) revert NothingToWithdraw();
        if (block.timestamp < p.readyAt) revert CooldownNotOver(p.readyAt);
        p.amount = 0;
        emit Withdrawn(msg.sender, modelId, amount);
        token.safeTransfer(msg.sender, amount);
    }

    /// @notice What `staker` has staked (earning) on `modelId`.
    function stakeOf(address staker, string calldata modelId) external view returns (uint256) {
        return _staked[staker][keccak256(bytes(modelId))];
    }

    /// @notice What `staker` has unstaked on `modelId` and not withdrawn, and when it may be.
    function pendingOf(address staker, string calldata modelId) external view returns (uint256 amount, uint64 readyAt) {
        Pending storage p = _pending[staker][keccak256(bytes(modelId))];
        return (p.amount, p.readyAt);
    }
}
