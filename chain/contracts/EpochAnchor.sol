// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title The anchor of ledgerlake's reward epochs.
/// @notice The owner (ledgerlake's anchoring key) records each epoch's Merkle root of
/// `(account, amount)` and the sha256 of its manifest, in strictly increasing epoch order.
/// Anyone can recompute both from the lakehouse (docs/epochs.md) and compare.
contract EpochAnchor is Ownable {
    struct Entry {
        bytes32 root;
        bytes32 manifestHash;
    }

    mapping(uint256 epoch => Entry) private _entries;
    /// @notice Whether any epoch was anchored, and the last one.
    bool public anchoredAny;
    uint256 public lastEpoch;

    event Anchored(uint256 indexed epoch, bytes32 indexed root, bytes32 manifestHash);

    error EpochNotIncreasing(uint256 epoch, uint256 lastEpoch);

    constructor(address owner_) Ownable(owner_) {}

    /// @notice Records epoch `epoch`'s root and manifest hash. Owner only; each epoch after
    /// the last one anchored. An epoch that pays no one has the root zero, which no claim
    /// can prove against.
    function anchor(uint256 epoch, bytes32 root, bytes32 manifestHash) external onlyOwner {
        if (anchoredAny && epoch <= lastEpoch) revert EpochNotIncreasing(epoch, lastEpoch);
        _entries[epoch] = Entry(root, manifestHash);
        anchoredAny = true;
        lastEpoch = epoch;
        emit Anchored(epoch, root, manifestHash);
    }

    /// @notice The root of `epoch` (zero if it was not anchored).
    function rootOf(uint256 epoch) external view returns (bytes32) {
        return _entries[epoch].root;
    }

    /// @notice The manifest hash of `epoch` (zero if it was not anchored).
    function manifestOf(uint256 epoch) external view returns (bytes32) {
        return _entries[epoch].manifestHash;
    }
}
