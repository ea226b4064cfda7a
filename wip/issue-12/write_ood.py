"""Format the hand-written OOD tickets (written by hand for issue 12) as chat records."""
import json, sys
sys.path.insert(0, "/work/main")
from labkit.tickets import SYSTEM_PROMPT, to_json, is_valid

B, T, A, S, R = "billing", "technical", "account", "shipping", "returns"
H, M, L = "high", "medium", "low"
NEG, NEU, POS = "negative", "neutral", "positive"
TICKETS = [
    ("you took my money TWICE for the pulse earbuds. order 58213. seriously annoyed. fix it today or i'm calling my bank",
     B, H, NEG, "Pulse Earbuds", "ORD-58213"),
    ("Good afternoon. I am 78 years old and not very good with computers. My grandson set up the Orbit vacuum cleaner for me "
     "but it now makes a loud grinding sound and stops after a minute. Could you tell me what to do? There is no hurry.\n"
     "With kind regards,\nMrs. Edith Brown", T, L, NEU, "Orbit Vacuum", None),
    ("Hey!! Just wanted to say the Lumen projector is AMAZING, movie nights are so much better now 😍 one small thing tho - "
     "the remote stopped pairing after the update, any tips? not in a hurry", T, L, POS, "Lumen Projector", None),
    ("Invoice INV-20931 lists 3 units but I only bought one Cedar desk lamp (ORD-44120). Please correct and resend.\n"
     "Regards,\nP. Okoye, Accounts, Finch & Marlow LLP", B, M, NEU, "Cedar Desk Lamp", "ORD-44120"),
    ("Can't get into my account. Tried resetting password 5 times. Nothing in spam either. Getting really fed up now.",
     A, M, NEG, None, None),
    ("Subject: Fwd: Your order has shipped\n\n---------- Forwarded message ----------\nYour order ORD-30517 (Atlas Backpack) "
     "has shipped!\n----------\n\nIt's been 12 days since this email and still nothing. This is getting ridiculous. "
     "Where is it? I need the backpack for a trip on Saturday.", S, H, NEG, "Atlas Backpack", "ORD-30517"),
    ("hello i want send back the blender, is to loud for my small apartament. the order number is 77302. thank you",
     R, M, NEU, "Harbor Blender", "ORD-77302"),
    ("Loving my new Vela watch so far, you lot are brilliant. Quick q: how do I change the email address on my account? "
     "Whenever you get a moment.", A, L, POS, "Vela Smartwatch", None),
    ("URGENT URGENT URGENT. Router dead. Whole office offline. Call me on 020 7946 0018.\n- Dev, Castlegate Accountants",
     T, H, NEU, "Nimbus Router", None),
    ("Hi, I ordered a kettle (order #61145) as a present and it arrived with the lid cracked. I would like a replacement "
     "sent out, please, rather than a refund. No rush as the birthday is next month.\nMany thanks, Joan",
     R, L, NEU, "Aurora Kettle", "ORD-61145"),
    ("Why is the price on my receipt $89.99 when the website said $69.99 for the Zephyr fan? ord-90412",
     B, M, NEU, "Zephyr Fan", "ORD-90412"),
    ("I have been waiting three weeks for a refund on the earbuds I posted back to you. Return tracking shows you received "
     "them on the 4th. This is the worst service I have ever had.", R, M, NEG, "Pulse Earbuds", None),
    ("my 2fa app got wiped when i reset my phone and now i cant sign in. pls help need access today for work",
     A, H, NEU, None, None),
    ("Dear team,\nPlease could you confirm whether you deliver to the Isle of Skye, and how long it usually takes? I'm "
     "thinking of ordering the Harbor Blender. Just planning ahead, no urgency.\nThank you, Morag",
     S, L, NEU, "Harbor Blender", None),
    ("Package was delivered to 14B instead of 41B. Neighbours say they don't have it. ORD 55871",
     S, M, NEU, None, "ORD-55871"),
    ("The desk lamp flickers like a horror movie lol. tried different bulbs and sockets. ideas?",
     T, M, NEU, "Cedar Desk Lamp", None),
    ("I'd like to close my account permanently and have all my personal data erased under GDPR. Please confirm when done. "
     "Customer no. 30988.", A, M, NEU, None, None),
    ("cancelled my subscription in march, still getting charged every month. that's 3 months now. really not impressed. "
     "refund the charges asap", B, H, NEG, None, None),
    ("Could someone explain the 'restocking fee' I was charged when I returned the Nimbus? order no. 23304",
     B, M, NEU, "Nimbus Router", "ORD-23304"),
    ("Hi there! Big thanks for the super fast delivery last time 🙂 This time though my parcel seems lost - tracking hasn't "
     "updated since Monday. Order ORD-80021.\nCheers, Sam", S, M, POS, None, "ORD-80021"),
    ("the smartwatch screen went black and wont come back on. its only 2 weeks old. can i get it fixed",
     T, M, NEU, "Vela Smartwatch", None),
    ("The smartwatch I got is the wrong size. I'd like to exchange it for the large one. ORD-12876. Not in a rush.",
     R, L, NEU, "Vela Smartwatch", "ORD-12876"),
    ("Your courier threw my parcel over the fence and it landed in a puddle. Backpack inside is soaked. Unbelievable, "
     "I'm so angry.", S, M, NEG, "Atlas Backpack", None),
    ("Hello, I run a small cafe (Brewed Awakening, 12 Quay Street) and we bought three Harbor blenders on order 41907. The "
     "card statement shows four payments. Please can this be looked at before our accountant closes the books on Friday.\n"
     "Thanks, Luis", B, H, NEU, "Harbor Blender", "ORD-41907"),
    ("I got an email saying someone logged into my account from another country. I didn't do that. Please lock it NOW.",
     A, H, NEU, None, None),
    ("Oh wonderful, the projector arrived with a dead pixel right in the middle. Exactly what I paid for. "
     "I want to send it back.", R, M, NEG, "Lumen Projector", None),
    ("Is it possible to return an opened item if it was a gift? I don't have the order number. I think it was the Aurora "
     "kettle. Take your time, thanks!", R, L, NEU, "Aurora Kettle", None),
    ("Quick one: VAT receipt for ORD-66234 please, our company needs it for expenses. Ta.", B, M, NEU, None, "ORD-66234"),
    ("My router keeps rebooting every 20 minutes since the update on Tuesday and I work from home, so this needs fixing by "
     "tomorrow. Model NR-400, serial 88213-X. Order was ORD-19876.", T, H, NEU, "Nimbus Router", "ORD-19876"),
    ("just wanna say ur customer service is the best, sorted my last problem in 5 min!! anyway the earbuds wont connect to "
     "my laptop, only to my phone. no rush x", T, L, POS, "Pulse Earbuds", None),
    ("I've moved house. Can the blender I ordered yesterday go to my new address instead? Order number 47120. New address: "
     "9 Birch Close, Leeds LS6 2QT.", S, M, NEU, "Harbor Blender", "ORD-47120"),
    ("Please stop sending me marketing emails and remove my phone number from my profile.", A, M, NEU, None, None),
    ("THE FAN IS MAKING A CLICKING NOISE AND THE OSCILLATION DOESN'T WORK. VERY DISAPPOINTED. I WANT TO RETURN IT AND GET "
     "MY MONEY BACK.", R, M, NEG, "Zephyr Fan", None),
    ("hi, can u tell me where my stuff is? ordered 2 weeks ago, ord12098. thx", S, M, NEU, None, "ORD-12098"),
    ("Two things: 1) I was charged for shipping on an order that should have had free shipping (ORD-71533) 2) my account "
     "still shows my old address.", B, M, NEU, None, "ORD-71533"),
    ("Ordered the Orbit Vacuum 3 weeks ago, still says 'processing'. Getting annoyed. I need it before my in-laws arrive "
     "on Sunday!", S, H, NEG, "Orbit Vacuum", None),
    ("To Whom It May Concern,\n\nI write regarding my recent purchase of a Cedar Desk Lamp (Order Reference: ORD-38291). The "
     "item was received in good condition; however, the finish is considerably darker than depicted on your website. I "
     "should therefore like to return it for a full refund.\n\nI would be grateful for instructions.\n\nYours faithfully,\n"
     "Dr. Alistair Grant", R, M, NEU, "Cedar Desk Lamp", "ORD-38291"),
    ("omg the earbuds are sooo good 😭 but my bf's pair got charged to my card by mistake?? can u refund that one",
     B, M, POS, "Pulse Earbuds", None),
    ("Our office ordered 10 Atlas backpacks for a staff event (PO 55120, order ORD-62218). Only 7 arrived. The event is "
     "on Thursday.", S, H, NEU, "Atlas Backpack", "ORD-62218"),
    ("can't log in on the website or the app, it says my password is wrong but I just reset it. nothing works.",
     A, M, NEU, None, None),
    ("Hello, I'm writing on behalf of my mother, Mrs. Patel. She bought a Zephyr fan from you in June and it has stopped "
     "spinning; she would like to know how to get it working again. No urgency.", T, L, NEU, "Zephyr Fan", None),
    ("Tracking number 1Z999AA10123456784 shows delivered. It's not here. Order 33019.", S, M, NEU, None, "ORD-33019"),
    ("I absolutely adore the Aurora kettle, best purchase this year! I'd love to buy a second one as a gift but the "
     "checkout keeps rejecting my Visa. Can you help?", B, M, POS, "Aurora Kettle", None),
    ("Received the wrong item: I ordered a projector (ORD-50772) but the box had someone else's stuff in it. Please send "
     "a return label.", R, M, NEU, "Lumen Projector", "ORD-50772"),
    ("The Nimbus app won't let me set up guest wifi. Is that a feature or not? Just curious, not urgent.",
     T, L, NEU, "Nimbus Router", None),
    ("I'm really disappointed. My Vela smartwatch was supposed to arrive yesterday for my wife's birthday and now tracking "
     "says 'delayed'. Order #84413.", S, M, NEG, "Vela Smartwatch", "ORD-84413"),
    ("Hi! Could you merge my two accounts? One is under my old email (j.reyes@oldmail.com), the other under "
     "j.reyes@newmail.com. Thanks a bunch, you guys are always so helpful!", A, M, POS, None, None),
    ("why does my bill say i owe a $15 'processing fee'??? never agreed to that. not happy", B, M, NEG, None, None),
    ("The vacuum's battery lasts 8 minutes. The box says 40. Is mine faulty? How do I fix it?",
     T, M, NEU, "Orbit Vacuum", None),
    ("I'd like to return the backpack please - wrong colour. It's unused, tags on. Order number is 20456.\nKind regards, "
     "Anya", R, M, NEU, "Atlas Backpack", "ORD-20456"),
    ("Need the invoice for ORD-91355 re-issued with our company name (Tern Engineering GmbH) on it TODAY, our auditors "
     "need it.", B, H, NEU, None, "ORD-91355"),
    ("Everything's fine with the router, love it actually! I just need to update the delivery address saved in my "
     "profile. Whenever.", A, L, POS, "Nimbus Router", None),
    ("Blender arrived in pieces. Literally. Glass jug shattered, box looked like it had been kicked down the stairs. "
     "Furious. ORD-27709", S, M, NEG, "Harbor Blender", "ORD-27709"),
    ("hey, quick question about returns: do i have to pay postage to send back the earbuds? bought them 10 days ago",
     R, M, NEU, "Pulse Earbuds", None),
    ("I was charged in euros instead of pounds for the Lumen projector and my bank added a conversion fee. Can you "
     "refund the difference? ORD-36650. You've been fantastic in the past, thanks!", B, M, POS, "Lumen Projector", "ORD-36650"),
    ("my password reset emails go to an address i no longer have. can you change it to m.tan@example.org? i've got a "
     "meeting where i need my purchase history in an hour!!", A, H, NEU, None, None),
    ("Smartwatch won't sync steps to the app since yesterday. Restarted both. Any ideas? Cheers",
     T, M, NEU, "Vela Smartwatch", None),
    ("It's been FIVE WEEKS. Five. My return (ORD-40218, Orbit vacuum) was received by your warehouse and I still have no "
     "refund. I am done being patient. Sort it out today.", R, H, NEG, "Orbit Vacuum", "ORD-40218"),
    ("Hi, the discount code SPRING20 didn't apply to my order ord 73104 - I paid full price. Not a big deal, whenever you "
     "can have a look. Love the lamp btw!", B, L, POS, "Cedar Desk Lamp", "ORD-73104"),
    ("Can I change my username? It still shows the name I used as a teenager, which is embarrassing lol",
     A, M, NEU, None, None),
    ("Parcel for ORD-25590 says it's at the depot but the depot says they don't have it. Been going back and forth for "
     "days. Pretty fed up with this.", S, M, NEG, None, "ORD-25590"),
    ("The Aurora Kettle switches itself off before the water boils. Had it a month. I'd rather get it repaired than "
     "replaced if possible. No rush, I have an old one.", T, L, NEU, "Aurora Kettle", None),
    ("Hi team, hope you're all well! Could you send me a copy of the receipt for order 48812? I lost the email. Thanks so "
     "much, you're stars.", B, M, POS, None, "ORD-48812"),
    ("My son signed up with my email by accident and now I can't create my own account. Can you remove his account or "
     "move it to his email? Need it sorted before school starts tomorrow.", A, H, NEU, None, None),
    ("the fan remote doesnt do anything. new batteries. still nothing. bit annoyed tbh", T, M, NEG, "Zephyr Fan", None),
    ("I returned the projector 2 weeks ago (return label RMA-55023) and haven't heard anything. Could you check on the "
     "refund please? Order ORD-11847.", R, M, NEU, "Lumen Projector", "ORD-11847"),
    ("I need to change the delivery address on order #64480 - I'll be away from Wednesday. please do it asap.",
     S, H, NEU, None, "ORD-64480"),
    ("Thank you for the quick refund last month! Sadly my new Pulse earbuds have the same issue - left bud crackles. "
     "Can you help me troubleshoot?", T, M, POS, "Pulse Earbuds", None),
]
rows = []
for i, (text, c, p, s, prod, oid) in enumerate(TICKETS):
    label = {"category": c, "priority": p, "sentiment": s, "product": prod, "order_id": oid}
    assert is_valid(label), label
    rows.append({"id": f"ood-{i:03d}", "messages": [
        {"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text},
        {"role": "assistant", "content": to_json(label)}]})
out = sys.argv[1]
with open(out, "w", encoding="utf-8") as f:
    for r in rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
print(len(rows), "tickets ->", out)
