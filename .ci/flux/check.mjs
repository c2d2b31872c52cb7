// Checks Flux queries with InfluxData's own Flux language server (@influxdata/flux-lsp-browser, WebAssembly).
//
// Input (stdin): a JSON array of {"name": ..., "query": ...}. Output (stdout): a JSON array, in the same order,
// of {"name", "valid", "diagnostics": [{"line", "character", "severity", "message"}]}: "valid" is the package's
// is_valid_flux() (parser and semantic checker), "diagnostics" what its language server publishes for the query
// opened as a document. Lines and characters are 1-based. Exit 0 whatever the verdict; 2 when the checker
// itself could not run. Driven by test_flux.py; install with `npm ci --prefix .ci/flux`.
//
// The package is a bundler build: its glue module starts with `import * as wasm from './…_bg.wasm'`, which
// plain node cannot import. So the loader reads the glue's text, replaces that import with a setter, imports
// the result, instantiates the .wasm with the glue's functions as its imports and hands the exports back.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";

const PACKAGE = "@influxdata/flux-lsp-browser";
const CACHE_LINES = /\ncachedInt32Memory0 = new Int32Array\(wasm\.memory\.buffer\);\ncachedUint8Memory0 = new Uint8Array\(wasm\.memory\.buffer\);\s*$/;

async function loadFlux() {
  const folder = dirname(createRequire(import.meta.url).resolve(`${PACKAGE}/package.json`));
  const glueName = "flux-lsp-browser_bg.js";
  const wasmImport = "import * as wasm from './flux-lsp-browser_bg.wasm';";
  let source = readFileSync(join(folder, glueName), "utf8");
  if (!source.includes(wasmImport) || !CACHE_LINES.test(source)) {
    throw new Error(`${PACKAGE}: ${glueName} is not shaped as this loader expects (new version?)`);
  }
  source = source.replace(CACHE_LINES, "\n").replace(wasmImport, [
    "let wasm;",
    "export function __loaderSetWasm(exports) {",
    "    wasm = exports;",
    "    cachedInt32Memory0 = new Int32Array(wasm.memory.buffer);",
    "    cachedUint8Memory0 = new Uint8Array(wasm.memory.buffer);",
    "}",
  ].join("\n"));
  const glue = await import("data:text/javascript," + encodeURIComponent(source));
  const bytes = readFileSync(join(folder, "flux-lsp-browser_bg.wasm"));
  const { instance } = await WebAssembly.instantiate(bytes, { [`./${glueName}`]: glue });
  glue.__loaderSetWasm(instance.exports);
  return glue;
}

// A language server session: JSON-RPC strings in and out, no Content-Length framing.
async function startServer(flux) {
  const published = new Map();  // uri -> the diagnostics last published for it
  const server = new flux.Lsp();
  server.onMessage((message) => {
    const { method, params } = JSON.parse(message);
    if (method === "textDocument/publishDiagnostics") published.set(params.uri, params.diagnostics);
  });
  server.run().then(
    () => fail(new Error("the language server stopped")), fail);
  let id = 0;
  const send = (method, params, request = false) => server.send(JSON.stringify(
    request ? { jsonrpc: "2.0", id: ++id, method, params } : { jsonrpc: "2.0", method, params }));
  const answer = JSON.parse(await send("initialize", { processId: null, rootUri: null, capabilities: {} }, true));
  if (!answer.result?.capabilities) throw new Error(`initialize failed: ${JSON.stringify(answer)}`);
  await send("initialized", {});

  // Each query is its own document in its own folder: the server treats the .flux files of a folder as one
  // package, so two queries side by side would be checked (and reported) together.
  let documents = 0;
  return async function diagnose(text) {
    const uri = `file:///queries/${++documents}/query.flux`;
    await send("textDocument/didOpen", { textDocument: { uri, languageId: "flux", version: 1, text } });
    for (let waited = 0; !published.has(uri); waited += 10) {
      if (waited > 10000) throw new Error(`no diagnostics published for ${uri} within 10 s`);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    await send("textDocument/didClose", { textDocument: { uri } });
    return published.get(uri).map(({ range, severity, message }) => (
      { line: range.start.line + 1, character: range.start.character + 1, severity, message }));
  };
}

async function main() {
  // The server logs through console.info and friends: keep stdout for the results.
  for (const level of ["debug", "info", "log", "warn"]) console[level] = console.error;
  const queries = JSON.parse(readFileSync(0, "utf8"));
  const flux = await loadFlux();
  const diagnose = await startServer(flux);
  const results = [];
  for (const { name, query } of queries) {
    results.push({ name, valid: flux.is_valid_flux(query), diagnostics: await diagnose(query) });
  }
  process.stdout.write(JSON.stringify(results, null, 1) + "\n");
}

function fail(error) {
  console.error(`flux check failed: ${error.stack || error}`);
  process.exit(2);
}

main().then(() => process.exit(0), fail);
