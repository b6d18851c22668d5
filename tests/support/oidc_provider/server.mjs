// A second OpenID Connect provider for the tests, of another implementation than the PSC stand-in:
// panva/oidc-provider (certified by the OpenID Foundation), configured like Pro Santé Connect where it can be
// (scope_all claims, acr eidas1..3, PKCE required, back-channel logout with sid) and left to its own
// behaviour everywhere else (auth_time only when asked, userinfo as JSON unless the client registered a
// signing algorithm, its own logout pages).
//
// Run: node server.mjs CONFIG.json, where CONFIG is
//   { "port": 9090, "issuer": "http://127.0.0.1:9090", "clients": [...client metadata...],
//     "identities": [{ "idnat", "family_name", "given_name", "profession", "auth_mode" }],
//     "mtls": false }
// With "mtls": true it expects a TLS terminator in front that verifies client certificates and hands
// them over in X-SSL-Client-Cert / X-SSL-Client-Verify (tls_client_auth, certificate-bound tokens).
//
// The login page (/interaction/:uid) stands in for the e-CPS app: POST idnat=<idNat> approves. Test-only:
// never expose this process beyond the loopback interface.

import crypto from 'node:crypto';
import { readFileSync } from 'node:fs';

import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const identities = new Map(config.identities.map((identity) => [identity.idnat, identity]));
const SCOPE_ALL_CLAIMS = [
  'SubjectNameID', 'preferred_username', 'given_name', 'family_name', 'email', 'authMode', 'SubjectRefPro',
];

// A PSC subject is f:<uuid>:<idNat>; the uuid is stable per idNat for the life of the process.
const subjects = new Map();
function subjectOf(idnat) {
  if (!subjects.has(idnat)) subjects.set(idnat, `f:${crypto.randomUUID()}:${idnat}`);
  return subjects.get(idnat);
}

function claimsOf(identity, sub) {
  return {
    sub,
    SubjectNameID: identity.idnat,
    preferred_username: identity.idnat,
    given_name: identity.given_name,
    family_name: identity.family_name,
    email: `${identity.idnat}@oidc-provider.test`,
    authMode: identity.auth_mode,
    SubjectRefPro: {
      codeCivilite: 'M',
      exercices: [{ codeProfession: identity.profession, codeCategorieProfessionnelle: 'C', activities: [] }],
    },
  };
}

const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: crypto.randomUUID(), alg: 'RS256', use: 'sig' };

function headerCertificate(ctx) {
  const escaped = ctx.get('x-ssl-client-cert');
  return escaped ? decodeURIComponent(escaped) : undefined;
}

const provider = new Provider(config.issuer, {
  clients: config.clients,
  jwks: { keys: [signingKey] },
  scopes: ['openid', 'scope_all'],
  claims: { openid: ['sub'], scope_all: SCOPE_ALL_CLAIMS },
  acrValues: ['eidas1', 'eidas2', 'eidas3'],
  pkce: { required: () => true },
  clientAuthMethods: ['client_secret_basic', 'private_key_jwt', ...(config.mtls ? ['tls_client_auth'] : [])],
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  features: {
    devInteractions: { enabled: false },
    backchannelLogout: { enabled: true },
    rpInitiatedLogout: { enabled: true },
    mTLS: {
      enabled: Boolean(config.mtls),
      tlsClientAuth: true,
      certificateBoundAccessTokens: true,
      getCertificate: headerCertificate,
      certificateAuthorized: (ctx) => ctx.get('x-ssl-client-verify') === 'SUCCESS',
      certificateSubjectMatches: (ctx, property, expected) => {
        if (property !== 'tls_client_auth_subject_dn') return false;
        return new crypto.X509Certificate(headerCertificate(ctx)).subject.split('\n').reverse().join(',') === expected;
      },
    },
  },
  discovery: config.discovery || {},
  // Its outgoing requests (back-channel logout) refuse loopback addresses against SSRF; here every relying
  // party is a test process on 127.0.0.1.
  fetch: (url, { dispatcher, ...options }) => globalThis.fetch(url, options),
  async findAccount(ctx, sub) {
    const identity = identities.get(sub.split(':').pop());
    if (!identity) return undefined;
    return { accountId: sub, claims: async () => claimsOf(identity, sub) };
  },
  // Every client here is the gateway itself: no consent page.
  async loadExistingGrant(ctx) {
    const { client, session } = ctx.oidc;
    const grantId = ctx.oidc.result?.consent?.grantId || session.grantIdFor(client.clientId);
    const grant = grantId
      ? await ctx.oidc.provider.Grant.find(grantId)
      : new ctx.oidc.provider.Grant({ clientId: client.clientId, accountId: session.accountId });
    grant.addOIDCScope('openid scope_all');
    await grant.save();
    return grant;
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
});

async function formOf(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

provider.use(async (ctx, next) => {
  const match = /^\/interaction\/([\w-]+)$/.exec(ctx.path);
  if (!match) return next();
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  if (ctx.method === 'GET') {
    const rows = [...identities.values()].map((identity) => `<li>${escapeHtml(identity.idnat)}
      ${escapeHtml(identity.family_name)} <button name="idnat" value="${escapeHtml(identity.idnat)}">Approuver</button></li>`);
    ctx.type = 'html';
    ctx.body = `<!doctype html><title>oidc-provider</title><h1>${escapeHtml(details.prompt.name)}</h1>
      <form method="post" action="${escapeHtml(ctx.path)}"><ul>${rows.join('')}</ul></form>`;
    return undefined;
  }
  const idnat = (await formOf(ctx.req)).get('idnat') || '';
  if (!identities.has(idnat)) {
    return provider.interactionFinished(ctx.req, ctx.res, { error: 'access_denied' });
  }
  const acr = (details.params.acr_values || 'eidas1').split(' ')[0];
  return provider.interactionFinished(
    ctx.req, ctx.res, { login: { accountId: subjectOf(idnat), acr } }, { mergeWithLastSubmission: false },
  );
});

// Behind the mTLS terminator (nginx), believe its X-Forwarded-Proto: the issuer is https there.
provider.proxy = Boolean(config.mtls);

// The tests read these in the process log when something does not arrive.
provider.on('backchannel.error', (ctx, err, client) => console.error(`backchannel.error ${client.clientId}: ${err} ${err.cause ?? ""}`));
provider.on('backchannel.success', (ctx, client, accountId, sid) => console.log(`backchannel.success ${client.clientId} ${sid}`));
provider.on('server_error', (ctx, err) => console.error(`server_error: ${err.stack}`));

provider.listen(config.port, '127.0.0.1', () => {
  console.log(`oidc-provider ${config.issuer} listening on 127.0.0.1:${config.port}`);
});
