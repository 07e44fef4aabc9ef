// Writes a fresh RSA-2048 signing key as a private JWKS `{ "keys": [jwk] }` for server.mjs (JWKS_FILE).
//
//   node gen-key.mjs OUT.json [KID]
//
// The kid defaults to the RFC 7638 thumbprint of the public key, so each new key has a new kid
// (restart server.mjs with a new file to simulate key rotation at the IdP).
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';

const [out, kidArg] = process.argv.slice(2);
if (!out) {
  process.stderr.write('usage: node gen-key.mjs OUT.json [KID]\n');
  process.exit(2);
}

const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = privateKey.export({ format: 'jwk' });
// RFC 7638: SHA-256 over the required public members in lexicographic order, no whitespace.
const thumbprint = crypto
  .createHash('sha256')
  .update(JSON.stringify({ e: jwk.e, kty: jwk.kty, n: jwk.n }))
  .digest('base64url');
const kid = kidArg ?? thumbprint;

fs.writeFileSync(out, `${JSON.stringify({ keys: [{ ...jwk, kid, alg: 'RS256', use: 'sig' }] }, null, 2)}\n`, {
  mode: 0o600,
});
process.stdout.write(`${kid}\n`);
