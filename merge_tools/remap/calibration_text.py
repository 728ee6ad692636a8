"""The built-in calibration text of --init auto: prose, numbers, code in several languages,
tables and several scripts, written for this project (no one's text is copied). What it
measures is how a transplanted model spreads probability over rows it has no trained row
for; --calibration-text FILE replaces it with the user's own domain."""

CALIBRATION_TEXT = r'''The river was low that autumn, and the ferry ran only twice a day. Mara waited on the stone steps
with a paper bag of pears, counting the gulls that circled the landing. When the boat finally came,
its engine coughing like an old dog, she stepped aboard and found a seat near the rail. "Is it
always this slow?" asked the man beside her. "Only when the water is tired," she said, and he
laughed, though she had not meant it as a joke.

Most of the town had left for the coast in August. The bakery kept its shutters half closed; the
library opened on Tuesdays and Fridays, from ten until four. Nobody minded. There was time to read,
to repair the fence, to write letters that would arrive after their news had gone stale.

## Notes on measurement

A ruler measures length; a clock measures duration; a survey measures opinion, badly. Each
instrument has a resolution, a range and a bias. If you weigh a 250 g parcel on a scale that reads
0.1 g, the last digit tells you about the scale's noise as much as about the parcel. Report 3
significant figures, not 7, and say how the value was obtained.

Between 2019 and 2024 the station recorded 1,284 days of rain, an average of 256.8 per year. The
wettest month was March 2021 (212.4 mm); the driest, July 2022 (3.1 mm). Temperatures ranged from
-11.5 °C to 38.9 °C. Invoice No. 40017-B, dated 2024-03-15, totals $1,947.60 (tax 8.25 %). Call +1
(555) 014-2398 or write to orders@example.com before 17:30 UTC.

Prices: 3 × 4.50 = 13.50; 12/4 = 3; 2^10 = 1024; 0.1 + 0.2 ≈ 0.30000000000000004; π ≈ 3.14159; e ≈
2.71828; √2 ≈ 1.41421.

```python
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Inventory:
    """Items on the shelves, by name, with their counts."""

    items: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, count: int = 1) -> None:
        if count <= 0:
            raise ValueError(f"count must be positive, got {count}")
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name: str, count: int = 1) -> bool:
        left = self.items.get(name, 0) - count
        if left < 0:
            return False
        if left == 0:
            del self.items[name]
        else:
            self.items[name] = left
        return True

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.items, indent=2, sort_keys=True))


def load(path: Path) -> Inventory:
    try:
        return Inventory(json.loads(path.read_text()))
    except FileNotFoundError:
        return Inventory()


if __name__ == "__main__":
    shelf = load(Path("shelf.json"))
    for word in ["apple", "pear", "apple", "fig"]:
        shelf.add(word)
    print(sorted(shelf.items.items(), key=lambda kv: (-kv[1], kv[0])))
```

```javascript
export async function fetchUsers(baseUrl, { page = 1, perPage = 20 } = {}) {
  const url = new URL("/api/users", baseUrl);
  url.searchParams.set("page", String(page));
  url.searchParams.set("per_page", String(perPage));
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  if (!response.ok) {
    throw new Error(`HTTP ${response.status}: ${await response.text()}`);
  }
  const { data, total } = await response.json();
  return { users: data.map((u) => ({ id: u.id, name: u.name.trim() })), total };
}
```

```c
#include <stdio.h>
#include <stdlib.h>

static int compare(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int values[argc > 1 ? argc - 1 : 1];
    for (int i = 1; i < argc; i++) values[i - 1] = atoi(argv[i]);
    qsort(values, argc - 1, sizeof values[0], compare);
    for (int i = 0; i < argc - 1; i++) printf("%d%c", values[i], i + 2 < argc ? ' ' : '\n');
    return 0;
}
```

```bash
#!/usr/bin/env bash
set -euo pipefail
for file in logs/*.log; do
  count=$(grep -c "ERROR" "$file" || true)
  [[ $count -gt 0 ]] && echo "$file: $count errors"
done | sort -t: -k2 -n -r | head -n 10
```

| city | population | area (km²) |
|------|-----------:|-----------:|
| Lisbon | 545,796 | 100.05 |
| Kraków | 804,237 | 326.8 |
| Osaka | 2,752,412 | 225.21 |

{"id": 7, "tags": ["alpha", "beta"], "active": true, "score": 0.875, "owner": null}

SELECT customer_id, COUNT(*) AS orders, SUM(total) AS spent
FROM orders
WHERE created_at >= '2024-01-01'
GROUP BY customer_id
HAVING COUNT(*) > 3
ORDER BY spent DESC
LIMIT 20;

Der Zug nach München fährt um 14:05 Uhr von Gleis 7 ab. Bitte beachten Sie, dass die Fahrkarten vor
dem Einsteigen entwertet werden müssen. Wir wünschen Ihnen eine angenehme Reise.

Le marché ouvre à sept heures, mais les meilleurs fromages disparaissent avant huit. Il faut arriver
tôt, apporter un panier et ne pas oublier la monnaie : certains vendeurs n'acceptent pas les cartes.

El museo está cerrado los lunes. Los martes la entrada es gratuita para estudiantes y jubilados; el
resto de la semana cuesta doce euros. ¿Quieres que reservemos una visita guiada?

Il treno per Firenze è in ritardo di venti minuti. Nel frattempo possiamo prendere un caffè e
guardare la piazza, che a quest'ora è piena di biciclette.

Поезд прибывает в Новосибирск рано утром. Возьмите тёплую одежду: в марте там ещё лежит снег, а
ветер с реки бывает очень холодным.

Το πρωί πήγαμε στην αγορά και αγοράσαμε ψωμί, ελιές και φρέσκα ψάρια. Το απόγευμα κάναμε βόλτα δίπλα
στη θάλασσα.

今日は朝から雨が降っていたので、図書館で本を読みながら一日を過ごしました。
帰りに駅前のパン屋でメロンパンを買い、家で温かいお茶と一緒に食べました。
明日は晴れるそうです。

我们计划下个月去西安旅行，参观兵马俑和古城墙。请提前预订酒店，并查看天气预报；如果下雨，我们可以改去博物馆。

서울의 겨울은 춥지만 맑은 날이 많습니다. 주말에는 친구들과 시장에 가서 떡볶이와 호떡을 사 먹었습니다.

يفتح المتجر أبوابه في الساعة التاسعة صباحاً ويغلق في المساء. نرجو من الزبائن الحفاظ على الهدوء واحترام الدور.

हम कल सुबह पहाड़ों की ओर निकलेंगे। रास्ता लंबा है, इसलिए पानी, फल और गर्म कपड़े साथ रखना ज़रूरी है।

Chúng tôi đã đi bộ dọc bờ sông vào buổi tối và ngắm những chiếc thuyền nhỏ trở về bến.

Yarın sabah erkenden yola çıkacağız; öğle yemeğini dağ evinde yiyip akşam şehre döneceğiz.

The meeting ran long. Priya presented the quarterly figures — revenue up 4 %, costs flat, headcount
down by two — and then, to everyone's surprise, proposed closing the northern warehouse. "We ship
less than a pallet a week from there," she said. "We can serve those customers from the depot in two
days instead of one." Some argued that the delay would cost more than the rent; others pointed out
that the roof had leaked twice since spring. In the end they agreed to gather three months of data
before deciding.

Q: How do I reset my password?
A: Open Settings → Account → Security, choose "Reset password", and follow the link we email you.
The link expires after 30 minutes.

1. Preheat the oven to 200 °C.
2. Mix 300 g flour, 5 g salt and 7 g dry yeast; add 210 ml warm water.
3. Knead for 10 minutes, rest for 1 hour, shape, and bake for 25–30 minutes.

def fib(n):  # 0, 1, 1, 2, 3, 5, 8, 13, 21, 34
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
'''
