// OpenZeppelin's StandardMerkleTree on standard input, for tests and independent checks.
//   node merkle.js of    {"values": [["0x..", "123"], ...]}   -> {"root", "dump"}
//   node merkle.js load  {"dump": <a StandardMerkleTree dump>} -> {"root", "proofs": [{"value", "proof", "verified"}]}
// `load` validates the whole tree (StandardMerkleTree.load) and proves every value.
const { StandardMerkleTree } = require('@openzeppelin/merkle-tree');

const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const mode = process.argv[2];
const encoding = ['address', 'uint256'];
let out;
if (mode === 'of') {
  const tree = StandardMerkleTree.of(input.values, encoding);
  out = { root: tree.root, dump: tree.dump() };
} else if (mode === 'load') {
  const tree = StandardMerkleTree.load(input.dump);
  const proofs = [];
  for (const [i, value] of tree.entries()) {
    const proof = tree.getProof(i);
    proofs.push({ value, proof, verified: StandardMerkleTree.verify(tree.root, encoding, value, proof) });
  }
  out = { root: tree.root, proofs };
} else {
  console.error('usage: node merkle.js of|load < input.json');
  process.exit(2);
}
process.stdout.write(JSON.stringify(out));
