// The Fastify parity app: plain behind apitally-proxy, or with the official plugin.
// Run: node app.js <port>   (listens on 127.0.0.1; PARITY_MODE=official for the plugin)
"use strict";

const Fastify = require("fastify");

// api key -> consumer; the same table as tests/apps/parity_common.py.
const CONSUMERS = {
  "key-acme": { identifier: "acme", name: "Acme Corp", group: "Enterprise" },
  "key-muller": { identifier: "muller", name: "Müller & Söhne", group: "Free" },
  "key-solo": { identifier: "solo" },
};

function consumerFor(request) {
  const auth = request.headers.authorization || "";
  return auth.startsWith("Bearer ") ? CONSUMERS[auth.slice(7)] : undefined;
}

async function routes(fastify) {
  fastify.get("/items", async () => [{ name: "a" }, { name: "b" }]);

  fastify.post(
    "/items",
    {
      schema: {
        body: {
          type: "object",
          required: ["name", "price"],
          properties: { name: { type: "string" }, price: { type: "number" } },
        },
      },
    },
    async (request, reply) => reply.code(201).send({ name: request.body.name }),
  );

  fastify.get("/items/:itemId", async (request, reply) => {
    const itemId = Number(request.params.itemId);
    if (itemId > 100) {
      return reply.code(404).send({ error: "no such item" });
    }
    return { id: itemId };
  });

  fastify.get("/users/:userId/orders/:orderId", async (request) => ({
    user: Number(request.params.userId),
    order: Number(request.params.orderId),
  }));

  fastify.get("/boom", async () => {
    throw new Error("boom");
  });
}

async function main() {
  const fastify = Fastify({ logger: false });

  if (process.env.PARITY_MODE === "official") {
    const { apitallyPlugin, setConsumer } = require("apitally/fastify");
    await fastify.register(apitallyPlugin, {
      clientId: process.env.APITALLY_CLIENT_ID,
      env: process.env.APITALLY_ENV,
    });
    // onRequest runs before validation, so 400s carry the consumer too.
    fastify.addHook("onRequest", async (request) => {
      const consumer = consumerFor(request);
      if (consumer) setConsumer(request, { ...consumer });
    });
  } else {
    // With apitally-proxy: name the consumer in response headers (error responses included).
    fastify.addHook("onSend", async (request, reply, payload) => {
      const consumer = consumerFor(request);
      if (consumer) {
        reply.header("X-Apitally-Consumer", encodeURIComponent(consumer.identifier));
        if (consumer.name) reply.header("X-Apitally-Consumer-Name", encodeURIComponent(consumer.name));
        if (consumer.group) reply.header("X-Apitally-Consumer-Group", encodeURIComponent(consumer.group));
      }
      return payload;
    });
  }

  await fastify.register(routes);

  // SIGTERM: close the server, which is when the official plugin sends its final sync.
  process.on("SIGTERM", () => {
    fastify.close().then(
      () => process.exit(0),
      () => process.exit(1),
    );
  });

  const port = Number(process.argv[2] || process.env.PORT || 3000);
  await fastify.listen({ host: "127.0.0.1", port });
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
