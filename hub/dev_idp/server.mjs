// MLaaS Hub development identity provider — FOR DEVELOPMENT AND TESTS ONLY.
//
// A real OpenID Connect provider (the OpenID-certified `oidc-provider` package) with demo users,
// passwords and groups read from a YAML file. It issues the same claims an institute AAI does:
// `preferred_username`, `email`, `groups` (a plain list) and `eduperson_entitlement` (EGI-style
// URNs). It listens on 127.0.0.1 only.
//
// Configuration comes from the environment (set by `mlaas up` and the tests):
//   MLAAS_IDP_PORT, MLAAS_IDP_USERS (users YAML), MLAAS_IDP_CLIENT_ID,
//   MLAAS_IDP_CLIENT_SECRET_FILE, MLAAS_IDP_REDIRECT_URIS (comma separated)

import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import { URL } from 'node:url';

import yaml from 'js-yaml';
import Provider from 'oidc-provider';

const HOST = '127.0.0.1';
const port = Number(process.env.MLAAS_IDP_PORT || 9000);
const issuer = `http://${HOST}:${port}`;
const usersFile = process.env.MLAAS_IDP_USERS || new URL('./users.yaml', import.meta.url).pathname;
const clientId = process.env.MLAAS_IDP_CLIENT_ID || 'mlaas-hub';
const secretFile = process.env.MLAAS_IDP_CLIENT_SECRET_FILE;
// the installation's generated demo passwords (mlaas.dev_idp_passwords; 0600 under state/secrets)
const passwordsFile = process.env.MLAAS_IDP_PASSWORDS;
// set when an operator forced the provider in front of a hub at a non-loopback address
const publicWarning = process.env.MLAAS_IDP_PUBLIC_WARNING || '';
const redirectUris = (process.env.MLAAS_IDP_REDIRECT_URIS || 'http://127.0.0.1:8000/hub/oauth_callback')
  .split(',').map((s) => s.trim()).filter(Boolean);

function fail(message) {
  console.error(`dev-idp: ${message}`);
  process.exit(2);
}

if (!secretFile) fail('MLAAS_IDP_CLIENT_SECRET_FILE is not set');
let clientSecret;
try {
  clientSecret = fs.readFileSync(secretFile, 'utf8').trim();
} catch (e) {
  fail(`cannot read the client secret file ${secretFile}: ${e.message}`);
}

function readYaml(file) {
  try {
    return yaml.load(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    return fail(`${file}: ${e.message}`);
  }
}

function loadUsers(file) {
  if (!passwordsFile) fail('MLAAS_IDP_PASSWORDS is not set (the launcher generates the demo passwords)');
  const doc = readYaml(file);
  const passwords = readYaml(passwordsFile)?.passwords ?? {};
  const users = new Map();
  for (const [i, u] of (doc?.users ?? []).entries()) {
    if (!u || typeof u.username !== 'string') {
      fail(`${file}: users[${i}] needs a username`);
    }
    const password = passwords[u.username];
    if (typeof password !== 'string' || password.length < 8) {
      fail(`${passwordsFile}: no generated password for ${u.username}`);
    }
    users.set(u.username, {
      username: u.username,
      password,
      name: u.name ?? u.username,
      email: u.email ?? `${u.username}@example.org`,
      groups: u.groups ?? [],
      entitlements: u.entitlements ?? [],
      omit: Array.isArray(u.omit_claims) ? u.omit_claims.filter((c) => c !== 'sub') : [],
    });
  }
  return users;
}

const users = loadUsers(usersFile);

function passwordMatches(user, given) {
  const a = crypto.createHash('sha256').update(user.password).digest();
  const b = crypto.createHash('sha256').update(String(given ?? '')).digest();
  return crypto.timingSafeEqual(a, b);
}

const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), use: 'sig', alg: 'RS256', kid: 'dev-idp' };

const provider = new Provider(issuer, {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    redirect_uris: redirectUris,
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  async findAccount(ctx, sub) {
    const user = users.get(sub);
    if (!user) return undefined;
    return {
      accountId: sub,
      async claims() {
        const claims = {
          sub,
          name: user.name,
          preferred_username: user.username,
          email: user.email,
          email_verified: true,
          groups: user.groups,
          eduperson_entitlement: user.entitlements,
        };
        // an account may leave claims out, as some AAIs do (tests of the hub's refusals)
        for (const name of user.omit) delete claims[name];
        return claims;
      },
    };
  },
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
    entitlements: ['eduperson_entitlement'],
  },
  scopes: ['openid', 'profile', 'email', 'groups', 'entitlements'],
  conformIdTokenClaims: false,
  features: { devInteractions: { enabled: false } },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  jwks: { keys: [signingKey] },
  ttl: { Session: 8 * 3600, Interaction: 3600, Grant: 8 * 3600 },
  renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = page('Sign-in error', `<p class="error">${escapeHtml(out.error)}: ${escapeHtml(out.error_description ?? '')}</p>`);
  },
});

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);
}

function page(title, body) {
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>${escapeHtml(title)}</title>
<style>body{font-family:system-ui,sans-serif;max-width:26rem;margin:4rem auto;color:#222}
.banner{background:#fff3cd;border:1px solid #e0c060;padding:.5rem .8rem;border-radius:4px;font-size:.9rem}
label{display:block;margin-top:1rem}input{width:100%;padding:.45rem;font-size:1rem;box-sizing:border-box}
button{margin-top:1.2rem;padding:.5rem 1.2rem;font-size:1rem}.error{color:#a00}</style></head>
<body><p class="banner">Development identity provider — demo accounts only, not for production.</p>
${publicWarning ? `<p class="banner error">${escapeHtml(publicWarning)}</p>` : ''}
<h1>${escapeHtml(title)}</h1>${body}</body></html>`;
}

function loginForm(uid, error = '', username = '') {
  return page('Sign in to MLaaS Hub', `
${error ? `<p class="error" role="alert">${escapeHtml(error)}</p>` : ''}
<form method="post" action="/interaction/${escapeHtml(uid)}/login" autocomplete="off">
  <label for="username">Username</label><input id="username" name="username" value="${escapeHtml(username)}" required autofocus>
  <label for="password">Password</label><input id="password" name="password" type="password" required>
  <button type="submit" id="login">Sign in</button>
</form>`);
}

async function readForm(req) {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 64 * 1024) throw new Error('form too large');
  }
  return new URLSearchParams(body);
}

function send(res, status, html) {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(html);
}

async function grantConsent(req, res, details) {
  const { prompt: { details: missing }, params, session, grantId } = details;
  const grant = grantId
    ? await provider.Grant.find(grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  const id = await grant.save();
  await provider.interactionFinished(req, res, { consent: { grantId: id } }, { mergeWithLastSubmission: true });
}

async function interaction(req, res, path) {
  const [, , uid, action] = path.split('/');
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) return send(res, 400, page('Sign-in error', '<p class="error">This sign-in link is stale.</p>'));
  const promptName = details.prompt.name;
  if (req.method === 'GET' && !action) {
    // Consent for the hub is granted by the institute (a first-party client): no consent screen.
    if (promptName === 'consent') return grantConsent(req, res, details);
    return send(res, 200, loginForm(uid));
  }
  if (req.method === 'POST' && action === 'login' && promptName === 'login') {
    const form = await readForm(req);
    const username = form.get('username') ?? '';
    const user = users.get(username);
    if (!user || !passwordMatches(user, form.get('password'))) {
      console.log(`dev-idp: failed sign-in for ${JSON.stringify(username)}`);
      return send(res, 401, loginForm(uid, 'Unknown username or wrong password.', username));
    }
    console.log(`dev-idp: ${username} signed in`);
    return provider.interactionFinished(req, res, { login: { accountId: username } }, { mergeWithLastSubmission: false });
  }
  return send(res, 400, page('Sign-in error', '<p class="error">Unexpected sign-in step.</p>'));
}

const callback = provider.callback();
const server = http.createServer(async (req, res) => {
  const path = new URL(req.url, issuer).pathname;
  if (path.startsWith('/interaction/')) {
    try {
      await interaction(req, res, path);
    } catch (e) {
      console.error(`dev-idp: interaction error: ${e.message}`);
      if (!res.headersSent) send(res, 400, page('Sign-in error', `<p class="error">${escapeHtml(e.message)}</p>`));
    }
    return;
  }
  if (path === '/health') {
    res.writeHead(200, { 'content-type': 'text/plain' });
    return res.end('ok');
  }
  return callback(req, res);
});

server.listen(port, HOST, () => {
  console.log('='.repeat(72));
  console.log(' MLaaS Hub DEVELOPMENT identity provider — for development and tests only.');
  console.log(` Issuer ${issuer} (bound to ${HOST}); ${users.size} demo users from ${usersFile}`);
  console.log('='.repeat(72));
});

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => process.exit(0));
}
