// A second writer, exactly as Wooster writes: LangChain JS FaissStore.load -> delete / addVectors -> save(dir).
// Usage (from the folder setup.sh built): node coowned_writer.mjs STORE_DIR OPS.json
//   OPS.json: {"delete": [ids], "add": [{"id", "text", "metadata", "vector"}]}
// Vectors are given (Wooster's embeddings would compute them): this tests what the files become, not a model.
import fs from "node:fs";
import { FaissStore } from "@langchain/community/vectorstores/faiss";
import { Document } from "@langchain/core/documents";

const [storeDir, opsPath] = process.argv.slice(2);
const ops = JSON.parse(fs.readFileSync(opsPath, "utf8"));
const none = { embedQuery: async () => { throw new Error("vectors are given"); },
               embedDocuments: async () => { throw new Error("vectors are given"); } };
const store = await FaissStore.load(storeDir, none);
if (ops.delete?.length) await store.delete({ ids: ops.delete });
if (ops.add?.length) {
  const docs = ops.add.map((a) => new Document({ pageContent: a.text, metadata: a.metadata ?? {} }));
  await store.addVectors(ops.add.map((a) => a.vector), docs, { ids: ops.add.map((a) => a.id) });
}
await store.save(storeDir);
console.log(JSON.stringify({ ntotal: store.index.ntotal() }));
