// Compiles chain/contracts/*.sol with solc-js (the npm `solc` package) against
// @openzeppelin/contracts and writes chain/build/<Contract>.json: {abi, bytecode}. The
// build is committed so the Rust crates build without Node; `node build.js --check`
// compiles again and fails if the committed files differ (the tests run it).
const fs = require('fs');
const path = require('path');
const solc = require('solc');

const here = __dirname;
const contracts = path.join(here, 'contracts');
const out = path.join(here, 'build');
const sources = {};
for (const f of fs.readdirSync(contracts).filter(f => f.endsWith('.sol')).sort()) {
  sources[f] = { content: fs.readFileSync(path.join(contracts, f), 'utf8') };
}
const input = {
  language: 'Solidity',
  sources,
  settings: {
    // ganache 7 runs Shanghai; Cancun's opcodes (mcopy, transient storage) are not used.
    evmVersion: 'shanghai',
    optimizer: { enabled: true, runs: 200 },
    outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object'] } },
  },
};
function findImports(p) {
  const candidates = [path.join(here, 'node_modules', p), path.join(contracts, p)];
  for (const c of candidates) if (fs.existsSync(c)) return { contents: fs.readFileSync(c, 'utf8') };
  return { error: `not found: ${p}` };
}
const result = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
const errors = (result.errors || []).filter(e => e.severity === 'error');
if (errors.length) {
  for (const e of errors) console.error(e.formattedMessage);
  process.exit(1);
}
const check = process.argv.includes('--check');
let differ = [];
fs.mkdirSync(out, { recursive: true });
for (const file of Object.keys(sources)) {
  for (const [name, c] of Object.entries(result.contracts[file])) {
    const text = JSON.stringify({ contractName: name, compiler: `solc ${solc.version()}`, abi: c.abi, bytecode: '0x' + c.evm.bytecode.object }, null, 1) + '\n';
    const target = path.join(out, `${name}.json`);
    if (check) {
      if (!fs.existsSync(target) || fs.readFileSync(target, 'utf8') !== text) differ.push(name);
    } else {
      fs.writeFileSync(target, text);
    }
  }
}
if (differ.length) {
  console.error(`chain/build differs from a fresh compile for: ${differ.join(', ')} (run: node chain/build.js)`);
  process.exit(1);
}
console.log(check ? 'chain/build matches the sources' : `wrote ${out}`);
