// An official x402 TypeScript client (`@x402/fetch` or `@x402/axios`, with `@x402/evm`
// and viem) paying one request, unmodified: tests/test_interop.py runs it with node,
// NODE_PATH naming the node_modules the Makefile's tools target fills. Input on stdin:
// {"client": "fetch"|"axios", "url", "method", "privateKey", "network", "token", "cap",
// "scheme": "exact" (the default) | "upto"};
// output on stdout: the answer's status, its PAYMENT-RESPONSE decoded by the client's own
// decodePaymentResponseHeader, and the body.
"use strict";

const { privateKeyToAccount } = require("viem/accounts");
const { ExactEvmScheme } = require("@x402/evm/exact/client");

function scheme(job, account) {
  if (job.scheme === "upto") {
    const { UptoEvmScheme } = require("@x402/evm/upto/client");
    return new UptoEvmScheme(account);
  }
  return new ExactEvmScheme(account);
}

function limits(job) {
  // The local USDC is no default asset of the official clients: allow it, up to `cap`.
  return { allowedAssets: [{ network: job.network, asset: job.token, maxAmountPerPayment: job.cap }] };
}

async function payWithFetch(job, account) {
  const { wrapFetchWithPayment, x402Client, decodePaymentResponseHeader } = require("@x402/fetch");
  const client = new x402Client().register(job.network, scheme(job, account));
  client.setSpendControls(limits(job));
  const pay = wrapFetchWithPayment(fetch, client);
  const response = await pay(job.url, { method: job.method });
  const header = response.headers.get("payment-response");
  return {
    status: response.status,
    header,
    settled: header ? decodePaymentResponseHeader(header) : null,
    receipt: response.headers.get("x-payment-response"),
    body: await response.text(),
  };
}

async function payWithAxios(job, account) {
  const axios = require("axios");
  const { wrapAxiosWithPayment, x402Client, decodePaymentResponseHeader } = require("@x402/axios");
  const client = new x402Client().register(job.network, scheme(job, account));
  if (typeof client.setSpendControls === "function") client.setSpendControls(limits(job));
  // Its interceptor pays on a 402 *error*: axios's default validateStatus, as users have it.
  const api = wrapAxiosWithPayment(axios.create(), client);
  let response;
  try {
    response = await api.request({ url: job.url, method: job.method, responseType: "text" });
  } catch (error) {
    if (!error.response) throw error;
    response = error.response; // a refusal after paying: its answer is what we read
  }
  const header = response.headers["payment-response"];
  return {
    status: response.status,
    header: header || null,
    settled: header ? decodePaymentResponseHeader(header) : null,
    receipt: response.headers["x-payment-response"] || null,
    body: String(response.data),
  };
}

async function main() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const job = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  const account = privateKeyToAccount(job.privateKey);
  const answer = job.client === "axios" ? await payWithAxios(job, account) : await payWithFetch(job, account);
  process.stdout.write(JSON.stringify(answer));
}

main().catch((error) => {
  process.stderr.write(String((error && error.stack) || error));
  process.exit(1);
});
