// Certified OIDC provider (panva/oidc-provider) shaped like Auth0, run on loopback by Custodia's tests.
//
// Configuration (environment; `--port N` / `--jwks FILE` / `--clients FILE` on the command line win):
//   PORT              TCP port on 127.0.0.1 (required; the tests pick a free one)
//   ISSUER            issuer URL, default `http://127.0.0.1:PORT/` (trailing slash, as Auth0's)
//   JWKS_FILE         JSON file `{ "keys": [ <RSA private JWK with kid> ] }` (see gen-key.mjs);
//                     without it an ephemeral key is generated and a warning is printed
//   CLIENTS_JSON      JSON array of clients, or CLIENTS_FILE naming a file holding one; default: the
//                     two demo clients below (one client_secret_basic, one client_secret_post)
//   DEMO_PASSWORD     the demo account's password, default `custodia-demo`
//   COOKIE_KEYS       comma-separated cookie signing keys (default: random per start)
//   STRICT_CLIENT_AUTH `0` lets a client use either client_secret_basic or client_secret_post, as
//                     the library does; by default each client must use its registered method
//   TOKEN_LOG         a file to append every token endpoint response body to, one per line, so
//                     tests know the tokens they must never find in the relying party's output
//
// When it is ready it prints exactly one line on stdout:
//   oidc-provider listening on http://127.0.0.1:PORT/
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';

import Provider from 'oidc-provider';

/** Value of `--name VALUE` on the command line, if any. */
function cliArg(name) {
  const at = process.argv.indexOf(`--${name}`);
  return at !== -1 && at + 1 < process.argv.length ? process.argv[at + 1] : undefined;
}

function fail(message) {
  process.stderr.write(`oidc-provider harness: ${message}\n`);
  process.exit(2);
}

const port = Number.parseInt(cliArg('port') ?? process.env.PORT ?? '', 10);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  fail('set PORT (or --port) to the TCP port to listen on');
}
const issuer = process.env.ISSUER ?? `http://127.0.0.1:${port}/`;
const demoPassword = process.env.DEMO_PASSWORD ?? 'custodia-demo';

/** The demo account: the only user this provider knows. */
const DEMO_ACCOUNT = {
  sub: 'auth0|custodia-demo',
  username: 'demo',
  email: 'demo@example.test',
  email_verified: true,
  name: 'Demo User',
  nickname: 'demo',
  picture: 'https://example.test/avatar/demo.png',
  // Auth0 sends updated_at as an RFC 3339 string, not the epoch number of the OIDC spec.
  updated_at: '2024-01-01T00:00:00.000Z',
};

const DEFAULT_CLIENTS = [
  {
    client_id: 'custodia-basic',
    client_secret: 'custodia-basic-secret',
    redirect_uris: ['http://127.0.0.1:8080/callback'],
    post_logout_redirect_uris: ['http://127.0.0.1:8080/'],
    token_endpoint_auth_method: 'client_secret_basic',
  },
  {
    client_id: 'custodia-post',
    client_secret: 'custodia-post-secret',
    redirect_uris: ['http://127.0.0.1:8080/callback'],
    post_logout_redirect_uris: ['http://127.0.0.1:8080/'],
    token_endpoint_auth_method: 'client_secret_post',
  },
];

function loadClients() {
  const file = cliArg('clients') ?? process.env.CLIENTS_FILE;
  const text = file ? fs.readFileSync(file, 'utf8') : process.env.CLIENTS_JSON;
  if (!text) return DEFAULT_CLIENTS;
  const clients = JSON.parse(text);
  if (!Array.isArray(clients)) fail('clients must be a JSON array');
  return clients.map((client) => ({
    grant_types: ['authorization_code'],
    response_types: ['code'],
    ...client,
  }));
}

function loadJwks() {
  const file = cliArg('jwks') ?? process.env.JWKS_FILE;
  if (file) {
    const jwks = JSON.parse(fs.readFileSync(file, 'utf8'));
    if (!Array.isArray(jwks.keys) || jwks.keys.length === 0) fail(`${file}: no "keys"`);
    return jwks;
  }
  process.stderr.write('oidc-provider harness: JWKS_FILE not set, using an ephemeral RSA key\n');
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { keys: [{ ...jwk, kid: crypto.randomUUID(), alg: 'RS256', use: 'sig' }] };
}

function escapeHtml(value) {
  return String(value).replace(/[&<>"']/g, (c) => ({
    '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
  })[c]);
}

const configuration = {
  clients: loadClients(),
  jwks: loadJwks(),
  cookies: {
    keys: process.env.COOKIE_KEYS
      ? process.env.COOKIE_KEYS.split(',')
      : [crypto.randomBytes(32).toString('base64url')],
  },
  routes: {
    authorization: '/authorize',
    token: '/oauth/token',
    jwks: '/.well-known/jwks.json',
    userinfo: '/userinfo',
    end_session: '/oidc/logout',
  },
  scopes: ['openid', 'offline_access'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'nickname', 'picture', 'updated_at'],
  },
  // Put the scope's claims into the ID token, as Auth0 does (the default keeps them for userinfo).
  conformIdTokenClaims: false,
  pkce: { required: () => true },
  // Fixed lifetimes (seconds); codes as short-lived as the dev IdP's.
  ttl: {
    AccessToken: 3600,
    AuthorizationCode: 60,
    Grant: 3600,
    IdToken: 3600,
    Interaction: 600,
    Session: 3600,
  },
  features: {
    devInteractions: { enabled: false },
  },
  interactions: {
    url: (_ctx, interaction) => `/interaction/${interaction.uid}`,
  },
  async findAccount(_ctx, sub) {
    if (sub !== DEMO_ACCOUNT.sub) return undefined;
    return {
      accountId: sub,
      async claims() {
        const { username: _unused, ...claims } = DEMO_ACCOUNT;
        return claims;
      },
    };
  },
  // No consent screen: every scope and claim the client asks for is granted.
  async loadExistingGrant(ctx) {
    const { client, session } = ctx.oidc;
    const grantId = ctx.oidc.result?.consent?.grantId || session.grantIdFor(client.clientId);
    const grant = (grantId && await ctx.oidc.provider.Grant.find(grantId))
      || new ctx.oidc.provider.Grant({ clientId: client.clientId, accountId: session.accountId });
    grant.addOIDCScope([...ctx.oidc.requestParamOIDCScopes].join(' '));
    const claims = [...ctx.oidc.requestParamClaims];
    if (claims.length) grant.addOIDCClaims(claims);
    await grant.save();
    return grant;
  },
};

const strictClientAuth = process.env.STRICT_CLIENT_AUTH !== '0';
const clientsById = new Map(configuration.clients.map((client) => [client.client_id, client]));

const provider = new Provider(issuer, configuration);
const providerCallback = provider.callback();

function loginPage(uid, error) {
  const message = error ? `<p class="error" role="alert">${escapeHtml(error)}</p>` : '';
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in — test provider</title></head>
<body>
<h1>Sign in (oidc-provider test harness)</h1>
${message}
<form method="post" action="/interaction/${escapeHtml(uid)}/login">
  <label>Username <input name="username" autocomplete="username"></label>
  <label>Password <input name="password" type="password" autocomplete="current-password"></label>
  <button type="submit">Sign in</button>
</form>
</body></html>`;
}

function send(res, status, html) {
  res.statusCode = status;
  res.setHeader('Content-Type', 'text/html; charset=utf-8');
  res.setHeader('Cache-Control', 'no-store');
  res.end(html);
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 56 * 1024) throw new Error('request body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

async function readForm(req) {
  return new URLSearchParams((await readBody(req)).toString('utf8'));
}

/** RFC 6749 §2.3.1: Basic credentials are form-urlencoded before base64. */
function formDecode(value) {
  return decodeURIComponent(value.replace(/\+/g, ' '));
}

/**
 * The library accepts client_secret_basic and client_secret_post interchangeably; this check holds
 * each client to its registered method, so a relying party configured with the wrong one fails. It reads the token request's body
 * (handing it to the library as `req.body`) and answers 401 invalid_client on a mismatch.
 * Returns true when it has answered.
 */
async function refuseWrongClientAuth(req, res) {
  const body = await readBody(req);
  req.body = body;
  const params = new URLSearchParams(body.toString('utf8'));
  const authorization = req.headers.authorization ?? '';
  let clientId;
  let used;
  if (/^basic /i.test(authorization)) {
    const decoded = Buffer.from(authorization.slice(6).trim(), 'base64').toString('utf8');
    const colon = decoded.indexOf(':');
    if (colon === -1) return false; // malformed: the library answers
    try {
      clientId = formDecode(decoded.slice(0, colon));
    } catch {
      return false;
    }
    used = 'client_secret_basic';
  } else if (params.has('client_secret')) {
    clientId = params.get('client_id');
    used = 'client_secret_post';
  } else {
    return false;
  }
  const registered = clientsById.get(clientId)?.token_endpoint_auth_method;
  if (registered === undefined || registered === used) return false;
  res.statusCode = 401;
  res.setHeader('Content-Type', 'application/json; charset=utf-8');
  res.setHeader('Cache-Control', 'no-store');
  res.end(JSON.stringify({
    error: 'invalid_client',
    error_description: `client ${clientId} must authenticate with ${registered}, not ${used}`,
  }));
  return true;
}

/** The login interaction: GET shows the form, POST checks the demo account's credentials. */
async function interaction(req, res, url) {
  const [, , uid, action] = url.pathname.split('/');
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) return send(res, 400, 'interaction mismatch');
  if (req.method === 'GET' && action === undefined) {
    return send(res, 200, loginPage(uid));
  }
  if (req.method === 'POST' && action === 'login') {
    const form = await readForm(req);
    const username = form.get('username') ?? '';
    const password = form.get('password') ?? '';
    if (username !== DEMO_ACCOUNT.username || password !== demoPassword) {
      return send(res, 401, loginPage(uid, 'Wrong username or password.'));
    }
    return provider.interactionFinished(
      req,
      res,
      { login: { accountId: DEMO_ACCOUNT.sub } },
      { mergeWithLastSubmission: false },
    );
  }
  return send(res, 405, 'method not allowed');
}

/** With TOKEN_LOG set: appends the body of this (token endpoint) response to that file. */
function recordTokenResponse(res) {
  const file = process.env.TOKEN_LOG;
  if (!file) return;
  const chunks = [];
  const keep = (chunk, encoding) => {
    if (chunk && typeof chunk !== 'function') {
      chunks.push(Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk, typeof encoding === 'string' ? encoding : 'utf8'));
    }
  };
  const write = res.write.bind(res);
  const end = res.end.bind(res);
  res.write = (chunk, encoding, ...rest) => {
    keep(chunk, encoding);
    return write(chunk, encoding, ...rest);
  };
  res.end = (chunk, encoding, ...rest) => {
    keep(chunk, encoding);
    fs.appendFileSync(file, `${Buffer.concat(chunks).toString('utf8').replace(/\n/g, ' ')}\n`);
    return end(chunk, encoding, ...rest);
  };
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url ?? '/', issuer);
  if (url.pathname === '/oauth/token') recordTokenResponse(res);
  if (url.pathname.startsWith('/interaction/')) {
    interaction(req, res, url).catch((err) => {
      process.stderr.write(`interaction error: ${err?.stack ?? err}\n`);
      if (!res.headersSent) send(res, 400, escapeHtml(err?.message ?? 'interaction failed'));
      else res.end();
    });
    return;
  }
  if (strictClientAuth && req.method === 'POST' && url.pathname === '/oauth/token') {
    refuseWrongClientAuth(req, res)
      .then((answered) => answered || providerCallback(req, res))
      .catch((err) => {
        process.stderr.write(`token request error: ${err?.stack ?? err}\n`);
        if (!res.headersSent) {
          res.statusCode = 400;
          res.setHeader('Content-Type', 'application/json; charset=utf-8');
          res.end(JSON.stringify({ error: 'invalid_request', error_description: String(err?.message) }));
        }
      });
    return;
  }
  providerCallback(req, res);
});

provider.on('server_error', (_ctx, err) => {
  process.stderr.write(`server_error: ${err?.stack ?? err}\n`);
});

server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`oidc-provider listening on http://127.0.0.1:${port}/\n`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
