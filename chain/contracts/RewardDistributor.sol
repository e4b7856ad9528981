// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {EpochAnchor} from "./EpochAnchor.sol";

/// @title Pays reward epochs' OPEN to whoever proves a leaf of an anchored root.
/// @notice Permissionless: anyone may submit a claim for any account; the tokens go to the
/// account. Each account claims each epoch once, and an epoch pays out at most the total
/// anchored with its root, so a root whose leaves sum to more (a faulty or forged tree)
/// cannot drain what other epochs are owed. Funded by the treasury transferring OPEN to it.
contract RewardDistributor {
    using SafeERC20 for IERC20;

    IERC20 public immutable token;
    EpochAnchor public immutable anchors;

    mapping(uint256 epoch => mapping(address account => bool)) public claimed;
    /// @notice OPEN base units paid out for each epoch so far.
    mapping(uint256 epoch => uint256) public paid;

    event Claimed(uint256 indexed epoch, address indexed account, uint256 amount);

    error AlreadyClaimed(uint256 epoch, address account);
    error NotAnchored(uint256 epoch);
    error InvalidProof();
    error EpochCapExceeded(uint256 epoch, uint256 total, uint256 wouldPay);

    constructor(IERC20 token_, EpochAnchor anchors_) {
        token = token_;
        anchors = anchors_;
    }

    /// @notice Pays `amount` to `account` for `epoch` if `proof` takes the leaf
    /// `keccak256(bytes.concat(keccak256(abi.encode(account, amount))))` (OpenZeppelin's
    /// StandardMerkleTree) to the epoch's anchored root, and the epoch's payouts stay
    /// within its anchored total.
    function claim(uint256 epoch, address account, uint256 amount, bytes32[] calldata proof) external {
        if (claimed[epoch][account]) revert AlreadyClaimed(epoch, account);
        (bytes32 root, uint256 total) = anchors.claimable(epoch);
        if (root == bytes32(0)) revert NotAnchored(epoch);
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(account, amount))));
        if (!MerkleProof.verifyCalldata(proof, root, leaf)) revert InvalidProof();
        uint256 after_ = paid[epoch] + amount;
        if (after_ > total) revert EpochCapExceeded(epoch, total, after_);
        paid[epoch] = after_;
        claimed[epoch][account] = true;
        emit Claimed(epoch, account, amount);
        token.safeTransfer(account, amount);
    }
}
