"""A browser wallet for the paywall tests: an EIP-1193 provider injected into every page
Chromium opens (Chrome DevTools `Page.addScriptToEvaluateOnNewDocument`), announced as
`window.ethereum` and over EIP-6963, holding one of anvil's dev accounts. It answers the
account and chain questions itself and forwards everything else, `eth_signTypedData_v4`
included, to anvil, which signs for its unlocked dev accounts.

The official paywall reads balances through the chain's well-known local RPC
(`http://127.0.0.1:8545`, viem's anvil chain); the script points those reads at this
test's anvil, wherever it listens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

from selenium.webdriver.remote.webdriver import WebDriver

from sidecar.tools.chain import AnvilChain, DevAccount

WALLET_NAME = "x402 Test Wallet"
WELL_KNOWN_RPC = "http://127.0.0.1:8545"

_PROVIDER = """
(() => {
  const RPC = %(rpc)s, ACCOUNT = %(account)s, CHAIN = %(chain)s, LOCAL = %(local)s;
  const realFetch = window.fetch.bind(window);
  window.fetch = (input, init) => {
    if (typeof input === "string" && input.startsWith(LOCAL)) {
      input = RPC + input.slice(LOCAL.length);
    }
    return realFetch(input, init);
  };
  let id = 0;
  const forward = async (method, params) => {
    const answer = await realFetch(RPC, {
      method: "POST", headers: {"content-type": "application/json"},
      body: JSON.stringify({jsonrpc: "2.0", id: ++id, method, params: params || []}),
    });
    const body = await answer.json();
    if (body.error) { const e = new Error(body.error.message); e.code = body.error.code; throw e; }
    return body.result;
  };
  const listeners = {};
  let connected = false;  // a first visit: the page asks the visitor to connect
  window.x402WalletCalls = [];
  const provider = {
    request: async ({method, params}) => {
      window.x402WalletCalls.push(method);
      switch (method) {
        case "eth_requestAccounts": connected = true; return [ACCOUNT];
        case "eth_accounts": return connected ? [ACCOUNT] : [];
        case "eth_chainId": return CHAIN;
        case "net_version": return String(parseInt(CHAIN, 16));
        case "wallet_switchEthereumChain": return null;
        case "wallet_requestPermissions": case "wallet_getPermissions":
          return [{parentCapability: "eth_accounts"}];
        default: return forward(method, params);
      }
    },
    on(event, fn) { (listeners[event] = listeners[event] || []).push(fn); return provider; },
    removeListener(event, fn) {
      listeners[event] = (listeners[event] || []).filter((f) => f !== fn); return provider;
    },
  };
  window.ethereum = provider;
  const info = Object.freeze({
    uuid: "5f2b1c3e-0d4a-4b8e-9c1f-402402402402", name: %(name)s, rdns: "org.x402.testwallet",
    icon: "data:image/svg+xml,%%3Csvg xmlns='http://www.w3.org/2000/svg'/%%3E",
  });
  const announce = () => window.dispatchEvent(
    new CustomEvent("eip6963:announceProvider", {detail: Object.freeze({info, provider})}));
  window.addEventListener("eip6963:requestProvider", announce);
  announce();
})();
"""


@contextmanager
def wallet(driver: WebDriver, chain: AnvilChain, account: DevAccount) -> Iterator[None]:
    """Every page this browser opens meanwhile finds the wallet of `account`."""
    source = _PROVIDER % {
        "rpc": json.dumps(chain.rpc_url),
        "account": json.dumps(account.address),
        "chain": json.dumps(hex(chain.chain_id)),
        "local": json.dumps(WELL_KNOWN_RPC),
        "name": json.dumps(WALLET_NAME),
    }
    added = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": source})
    try:
        yield
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", added)
