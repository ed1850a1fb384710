"""The page at `/`: upload a page image, ask a question, see the answer beside the image.

Plain HTML and script, no external resources: the browser reads the file as a data: URL and posts the same OpenAI
request any client sends, so the page exercises the real API (and its errors).
"""

PAGE_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>florence-ops: ask a document</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem; color: #1d2433; background: #f6f7f9; }
  h1 { font-size: 1.4rem; margin: 0 0 1rem; }
  form { display: flex; flex-wrap: wrap; gap: .75rem; align-items: end; margin-bottom: 1.5rem; }
  label { display: flex; flex-direction: column; font-size: .85rem; gap: .25rem; }
  input[type=text], input[type=password] { width: 26rem; max-width: 80vw; padding: .45rem; font-size: 1rem; }
  button { padding: .5rem 1.2rem; font-size: 1rem; cursor: pointer; }
  main { display: flex; gap: 2rem; align-items: flex-start; flex-wrap: wrap; }
  #preview { max-width: 46vw; max-height: 80vh; border: 1px solid #c8ccd4; background: white; }
  #result { min-width: 18rem; max-width: 32rem; }
  #answer { font-size: 1.6rem; font-weight: 600; margin: .3rem 0 1rem; word-break: break-word; }
  #error { color: #b00020; }
  .muted { color: #5b6475; font-size: .85rem; }
</style>
</head>
<body>
<h1>Ask a question about a document page</h1>
<form id="ask-form">
  <label>Page image <input id="image" type="file" accept="image/*" required></label>
  <label>Question <input id="question" type="text" placeholder="What is the invoice number?" required></label>
  <label>API token (if the server needs one) <input id="token" type="password" autocomplete="off"></label>
  <button id="ask" type="submit">Ask</button>
</form>
<main>
  <img id="preview" alt="the uploaded page" hidden>
  <section id="result" aria-live="polite">
    <div class="muted" id="asked"></div>
    <div id="answer"></div>
    <div id="error"></div>
    <div class="muted" id="meta"></div>
  </section>
</main>
<script>
const $ = (id) => document.getElementById(id);
let dataUrl = null;
$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => { dataUrl = reader.result; $("preview").src = dataUrl; $("preview").hidden = false; };
  reader.readAsDataURL(file);
});
$("ask-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("question").value;
  $("answer").textContent = ""; $("error").textContent = ""; $("meta").textContent = "";
  if (!dataUrl) { $("error").textContent = "Choose a page image first."; return; }
  $("asked").textContent = "Q: " + question;
  $("ask").disabled = true;
  const headers = {"Content-Type": "application/json"};
  if ($("token").value) headers["Authorization"] = "Bearer " + $("token").value;
  const body = {model: "florence-ops", messages: [{role: "user", content: [
    {type: "text", text: question}, {type: "image_url", image_url: {url: dataUrl}}]}]};
  try {
    const response = await fetch("v1/chat/completions", {method: "POST", headers, body: JSON.stringify(body)});
    const reply = await response.json();
    if (!response.ok) {
      $("error").textContent = (reply.error && reply.error.message) || ("HTTP " + response.status);
    } else {
      $("answer").textContent = reply.choices[0].message.content || "(empty answer)";
      $("meta").textContent = "model " + reply.model + " (version " + reply.system_fingerprint + "), "
        + reply.usage.completion_tokens + " answer tokens";
    }
  } catch (error) {
    $("error").textContent = "Request failed: " + error;
  } finally {
    $("ask").disabled = false;
  }
});
</script>
</body>
</html>
"""
