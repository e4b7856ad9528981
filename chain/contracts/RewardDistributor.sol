// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {EpochAnchor} from "./EpochAnchor.sol";

/// @title Pays reward epochs' OPEN to whoever proves a leaf of an anchored root.
/// @notice Permissionless: anyone may submit a claim for any account; the tokens go to the
/// account. Each account claims each epoch once. Funded by transferring OPEN to it.
contract RewardDistributor {
    using SafeERC20 for IERC20;

    IERC20 public immutable token;
    EpochAnchor public immutable anchors;

    mapping(uint256 epoch => mapping(address account => bool)) public claimed;

    event Claimed(uint256 indexed epoch, address indexed account, uint256 amount);

    error AlreadyClaimed(uint256 epoch, address account);
    error NotAnchored(uint256 epoch);
    error InvalidProof();

    constructor(IERC20 token_, EpochAnchor anchors_) {
        token = token_;
        anchors = anchors_;
    }

    /// @notice Pays `amount` to `account` for `epoch` if `proof` takes the leaf
    /// `keccak256(bytes.concat(keccak256(abi.encode(account, amount))))` (OpenZeppelin's
    /// StandardMerkleTree) to the epoch's anchored root.
    function claim(uint256 epoch, address account, uint256 amount, bytes32[] calldata proof) external {
        if (claimed[epoch][account]) revert AlreadyClaimed(epoch, account);
        bytes32 root = anchors.rootOf(epoch);
        if (root == bytes32(0)) revert NotAnchored(epoch);
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(account, amount))));
        if (!MerkleProof.verifyCalldata(proof, root, leaf)) revert InvalidProof();
        claimed[epoch][account] = true;
        emit Claimed(epoch, account, amount);
        token.safeTransfer(account, amount);
    }
}
