// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";

/// @title The anchor of ledgerlake's reward epochs.
/// @notice Holders of ANCHORER_ROLE (ledgerlake's online anchoring key) record each epoch's
/// Merkle root of `(account, amount)`, the sha256 of its manifest and the total its leaves
/// pay, in strictly increasing epoch order. Anyone can recompute all three from the
/// lakehouse (docs/epochs.md) and compare. The admin (DEFAULT_ADMIN_ROLE, the deployer's
/// choice: a cold key or a multisig) grants and revokes the anchoring role and nothing
/// else: it cannot anchor, and it holds no OPEN.
contract EpochAnchor is AccessControl {
    bytes32 public constant ANCHORER_ROLE = keccak256("ANCHORER_ROLE");

    struct Entry {
        bytes32 root;
        bytes32 manifestHash;
        uint256 total;
    }

    mapping(uint256 epoch => Entry) private _entries;
    /// @notice Whether any epoch was anchored, and the last one.
    bool public anchoredAny;
    uint256 public lastEpoch;

    event Anchored(uint256 indexed epoch, bytes32 indexed root, bytes32 manifestHash, uint256 total);

    error EpochNotNext(uint256 epoch, uint256 lastEpoch);
    error ZeroAddress();

    constructor(address admin, address anchorer) {
        if (admin == address(0) || anchorer == address(0)) revert ZeroAddress();
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(ANCHORER_ROLE, anchorer);
    }

    /// @notice Records epoch `epoch`'s root, manifest hash and the total OPEN its leaves pay
    /// (the distributor pays no more for it). Anchorers only. Epochs close in order, so
    /// each is the one right after the last anchored: a stolen key cannot jump to the end
    /// of the range and block every later epoch. An epoch that pays no one has the root
    /// zero, which no claim can prove against.
    function anchor(uint256 epoch, bytes32 root, bytes32 manifestHash, uint256 total) external onlyRole(ANCHORER_ROLE) {
        if (anchoredAny && epoch != lastEpoch + 1) revert EpochNotNext(epoch, lastEpoch);
        _entries[epoch] = Entry(root, manifestHash, total);
        anchoredAny = true;
        lastEpoch = epoch;
        emit Anchored(epoch, root, manifestHash, total);
    }

    /// @notice The root of `epoch` (zero if it was not anchored).
    function rootOf(uint256 epoch) external view returns (bytes32) {
        return _entries[epoch].root;
    }

    /// @notice The manifest hash of `epoch` (zero if it was not anchored).
    function manifestOf(uint256 epoch) external view returns (bytes32) {
        return _entries[epoch].manifestHash;
    }

    /// @notice The total OPEN base units `epoch`'s leaves pay (zero if it was not anchored).
    function totalOf(uint256 epoch) external view returns (uint256) {
        return _entries[epoch].total;
    }

    /// @notice The root and total of `epoch`, in one call (what a claim needs).
    function claimable(uint256 epoch) external view returns (bytes32 root, uint256 total) {
        Entry storage e = _entries[epoch];
        return (e.root, e.total);
    }
}
