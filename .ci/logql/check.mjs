// Checks LogQL queries with Grafana's own LogQL parser (@grafana/lezer-logql, the grammar of Grafana's query editor).
//
// Input (stdin): a JSON array of {"name": ..., "query": ...}. Output (stdout): a JSON array, in the same order, of
// {"name", "errors": [{"line", "column"}]}: where each error node of the parse tree starts (1-based). A Lezer
// parser does not throw on bad input: it recovers and marks what it could not parse with error nodes (type "⚠",
// type.isError), so those are what we look for. Exit 0 whatever the verdict; 2 when the checker itself could not
// run. Driven by test_logql.py; install with `npm ci --prefix .ci/logql`.
import { readFileSync } from "node:fs";
import { parser } from "@grafana/lezer-logql";

function errors(query) {
  const found = [];
  parser.parse(query).iterate({
    enter(node) {
      if (!node.type.isError) return;
      const before = query.slice(0, node.from).split("\n");
      found.push({ line: before.length, column: before[before.length - 1].length + 1 });
    },
  });
  return found;
}

try {
  const queries = JSON.parse(readFileSync(0, "utf8"));
  const results = queries.map(({ name, query }) => ({ name, errors: errors(query) }));
  process.stdout.write(JSON.stringify(results, null, 1) + "\n");
} catch (error) {
  console.error(`logql check failed: ${error.stack || error}`);
  process.exit(2);
}
