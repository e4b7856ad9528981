// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title OPEN, the token rewards are paid in.
/// @notice A fixed supply of 1,000,000,000 OPEN (18 decimals), all minted once to the
/// treasury, which funds the reward distributor. Nobody can mint more.
contract OpenToken is ERC20 {
    uint256 public constant SUPPLY = 1_000_000_000 * 10 ** 18;

    error ZeroAddress();

    constructor(address treasury) ERC20("OPEN", "OPEN") {
        if (treasury == address(0)) revert ZeroAddress();
        _mint(treasury, SUPPLY);
    }
}
